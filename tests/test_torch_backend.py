"""rayclust.torch_backend on a real local Ray: two Ray Train workers join one torch process group
and leave it at the end, the Train controller never loads torch, and neither does the driver's
side of training; a run without datasets starts no dataset manager, and on a Ray that ends with
the job no placement-group cleaner."""
from __future__ import annotations

import subprocess
import sys
import tempfile

import psutil
import pytest
import ray.train
from ray.train import RunConfig, ScalingConfig

from rayclust.torch_backend import LeanTrainer, TorchProcessGroup

from conftest import REPO

HELPERS = ("TrainController", "DatasetManager", "PlacementGroupCleaner")


def helper_counter():
    """A function that counts, on a Train worker, the processes of this Ray (its raylet's children,
    not another test's Ray) that run each of HELPERS' actors. Made here, so that Ray ships it by
    value: workers cannot import tests/."""
    def helper_processes() -> dict:
        raylet = psutil.Process().parent()
        commands = [" ".join(process.cmdline()) for process in raylet.children()]
        return {helper: sum(helper in command for command in commands) for helper in HELPERS}

    return helper_processes


@pytest.mark.slow
def test_a_run_on_a_ray_that_ends_with_the_job_starts_only_the_controller(ray_session, tmp_path):
    helper_processes = helper_counter()

    def count_helpers() -> None:
        with tempfile.TemporaryDirectory() as directory:  # a run's result keeps the metrics of its checkpoints
            ray.train.report({"helpers": helper_processes()}, checkpoint=ray.train.Checkpoint.from_directory(directory))

    trainer = LeanTrainer(count_helpers, backend_config=TorchProcessGroup("gloo"),
                          scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                          run_config=RunConfig(name="helpers", storage_path=str(tmp_path)), ray_ends_with_job=True)
    helpers = trainer.fit().metrics["helpers"]
    assert helpers == {"TrainController": 1, "DatasetManager": 0, "PlacementGroupCleaner": 0}


@pytest.mark.slow
def test_two_workers_all_reduce_through_one_process_group_and_the_controller_has_no_torch(ray_session, tmp_path):
    helper_processes = helper_counter()

    def all_reduce_ranks() -> None:  # defined here, so that Ray ships it by value: workers cannot import tests/
        import torch
        import torch.distributed as dist

        total = torch.tensor([ray.train.get_context().get_world_rank() + 1.0])
        dist.all_reduce(total)
        raylet = psutil.Process().parent()  # this Ray's, not another test's on the same machine
        controllers = [process for process in raylet.children() if "TrainController" in " ".join(process.cmdline())]
        metrics = {"sum": total.item(), "world": dist.get_world_size(), "backend": dist.get_backend(),
                   "helpers": helper_processes(),
                   "torch_in_controller": any("libtorch" in region.path for process in controllers
                                              for region in process.memory_maps())}
        with tempfile.TemporaryDirectory() as directory:  # a run's result keeps the metrics of its checkpoints
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    trainer = LeanTrainer(
        all_reduce_ranks, backend_config=TorchProcessGroup("gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="all-reduce", storage_path=str(tmp_path)), ray_ends_with_job=False,
    )
    metrics = trainer.fit().metrics
    assert (metrics["sum"], metrics["world"], metrics["backend"]) == (3.0, 2, "gloo")  # ranks 0 + 1, plus one each
    assert not metrics["torch_in_controller"]
    # a Ray that outlives the job keeps the cleaner, which removes the run's placement group if the controller dies
    assert metrics["helpers"] == {"TrainController": 1, "DatasetManager": 0, "PlacementGroupCleaner": 1}


def test_the_drivers_side_of_training_does_not_import_torch():
    probe = ("import sys, rayclust.training, rayclust.commands.train, rayclust.torch_backend; "
             "print(sorted(name for name in ('torch', 'torchvision') if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
