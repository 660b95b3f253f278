"""rayclust.torch_backend on a real local Ray: two Ray Train workers join one torch process group
and leave it at the end, the Train controller never loads torch, and neither does the driver's
side of training."""
from __future__ import annotations

import subprocess
import sys
import tempfile

import psutil
import pytest
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from rayclust.torch_backend import TorchProcessGroup

from conftest import REPO


@pytest.mark.slow
def test_two_workers_all_reduce_through_one_process_group_and_the_controller_has_no_torch(ray_session, tmp_path):
    def all_reduce_ranks() -> None:  # defined here, so that Ray ships it by value: workers cannot import tests/
        import torch
        import torch.distributed as dist

        total = torch.tensor([ray.train.get_context().get_world_rank() + 1.0])
        dist.all_reduce(total)
        raylet = psutil.Process().parent()  # this Ray's, not another test's on the same machine
        controllers = [process for process in raylet.children() if "TrainController" in " ".join(process.cmdline())]
        metrics = {"sum": total.item(), "world": dist.get_world_size(), "backend": dist.get_backend(),
                   "controllers": len(controllers),
                   "torch_in_controller": any("libtorch" in region.path for process in controllers
                                              for region in process.memory_maps())}
        with tempfile.TemporaryDirectory() as directory:  # a run's result keeps the metrics of its checkpoints
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    trainer = DataParallelTrainer(
        all_reduce_ranks, backend_config=TorchProcessGroup("gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="all-reduce", storage_path=str(tmp_path)),
    )
    metrics = trainer.fit().metrics
    assert (metrics["sum"], metrics["world"], metrics["backend"]) == (3.0, 2, "gloo")  # ranks 0 + 1, plus one each
    assert metrics["controllers"] == 1 and not metrics["torch_in_controller"]


def test_the_drivers_side_of_training_does_not_import_torch():
    probe = ("import sys, rayclust.training, rayclust.commands.train, rayclust.torch_backend; "
             "print(sorted(name for name in ('torch', 'torchvision') if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
