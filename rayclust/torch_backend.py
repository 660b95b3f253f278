"""DDP on Ray Train with torch imported by the training workers only, and no helper actor a run
has no use for.

Ray Train's ``TorchConfig`` imports torch in every process that holds it: the driver that builds
the trainer and the Train controller that starts the backend, about 260 MiB of private memory each
(BENCHMARKS.md, *Training memory*).
``TorchProcessGroup`` is a ``ray.train.BackendConfig`` that joins the workers into one
``torch.distributed`` process group (rank 0's node and a free port of it as the rendezvous) and
leaves it at the end, with every torch call made on the workers.

``LeanTrainer`` is Ray Train's ``DataParallelTrainer`` without two helper actors that a run may
have no use for, each a Python process of ~120 MiB PSS (~200 MiB RSS): the dataset manager of a run
without Ray Datasets (a feature model's workers read their table themselves, ``train_data``), and,
on a local Ray that ends with the job, the detached placement-group cleaner, which removes a run's
placement group if its controller dies while the cluster lives on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import ray
from ray.exceptions import GetTimeoutError
from ray.train import BackendConfig
from ray.train.backend import Backend
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

logger = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 30  # a worker stuck in a collective must not hold the run's end (or its restart)


@dataclass
class TorchProcessGroup(BackendConfig):
    backend: str = "gloo"  # "nccl" for GPU workers
    timeout_s: int = 1800  # of every collective: a lost peer fails the step, and Ray Train restarts the run

    @property
    def backend_cls(self) -> type[Backend]:
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return on_worker_device

    def to_dict(self) -> dict:
        return {"backend": self.backend, "timeout_s": self.timeout_s}


class LeanTrainer(DataParallelTrainer):
    """``DataParallelTrainer`` whose run starts no dataset manager without datasets and, with
    ``ray_ends_with_job``, no placement-group cleaner."""

    def __init__(self, *args, ray_ends_with_job: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.ray_ends_with_job = ray_ends_with_job

    def _create_default_callbacks(self) -> list:
        return [callback for callback in super()._create_default_callbacks() if not self.idle_helper(callback)]

    def idle_helper(self, callback: object) -> bool:
        if isinstance(callback, DatasetsCallback):
            return not self.datasets
        return isinstance(callback, PlacementGroupCleanerCallback) and self.ray_ends_with_job


class ProcessGroupBackend(Backend):
    # each worker sees its node's GPUs (NCCL needs to) and picks its own in on_worker_device
    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: TorchProcessGroup) -> None:
        address, world = worker_group.execute_single(0, rendezvous_address), len(worker_group)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend_config, address, rank, world)
                 for rank in range(world)])

    def on_shutdown(self, worker_group, backend_config: TorchProcessGroup) -> None:
        try:
            ray.get(worker_group.execute_async(leave_process_group), timeout=LEAVE_TIMEOUT_S)
        except GetTimeoutError:
            logger.warning("the torch process group did not close in %d s", LEAVE_TIMEOUT_S)


def rendezvous_address() -> str:
    """On rank 0: a TCP address of its node with a port free at the time of asking."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    host = ray.util.get_node_ip_address()
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def join_process_group(config: TorchProcessGroup, address: str, rank: int, world: int) -> None:
    import torch.distributed as dist

    if config.backend == "nccl":  # a collective that times out (a peer lost) ends the worker, and the run restarts
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(config.backend, init_method=address, rank=rank, world_size=world,
                            timeout=timedelta(seconds=config.timeout_s))


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def on_worker_device() -> Iterator[None]:
    """Around the training function on each worker: a GPU worker's CUDA calls go to its own GPU."""
    import torch

    if torch.cuda.is_available():
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
    yield
