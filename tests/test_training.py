"""Training on real features (scikit-learn's digits): Ray Train with several workers, checkpoints,
LATEST and resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rayclust.features import write_feature_arrays
from rayclust.lake import FEATURES, MODELS, Lake
from rayclust.models import model_config
from rayclust.models.checkpoint import load_model
from rayclust.training import TrainSettings, evaluate_checkpoint, train

from conftest import REPO

ROWS_PER_SHARD = 900
DIGITS = 1797


def write_digits_feature_lake(data: dict[str, np.ndarray], lake_uri: str, shards: int) -> Lake:
    """The first ``shards`` x 900 digits as a feature table (the last shard holds what is left)."""
    lake = Lake.open(lake_uri)
    for s in range(shards):
        rows = slice(s * ROWS_PER_SHARD, (s + 1) * ROWS_PER_SHARD)
        write_feature_arrays(lake, f"digits-{s:02d}", data["keys"][rows], data["labels"][rows],
                             data["clean"][rows], data["views"][rows], "digits-pixels")
    return lake


@pytest.fixture(scope="module")
def real_feature_lake(tmp_path_factory, digits_features) -> Lake:
    return write_digits_feature_lake(digits_features, str(tmp_path_factory.mktemp("lake")), shards=2)


def test_two_workers_on_two_cores_train_and_beat_chance(ray_session, real_feature_lake):
    """--workers 2 on a 2-CPU Ray must not hang waiting for CPUs that Ray Data also needs; DDP
    also runs the self-labelling epoch, which leaves the instance head without gradients."""
    latest = train(TrainSettings(real_feature_lake.uri, "mfavb", clusters=10, epochs=3, batch_size=128,
                                 workers=2, run="two-workers", self_label_epochs=1))
    assert latest["model_version"] == "two-workers/epoch-3"
    assert latest["metrics"]["phase"] == "self-labelling"
    assert real_feature_lake.read_json(MODELS, "LATEST")["run"] == "two-workers"
    assert np.isfinite(latest["metrics"]["loss"])
    heads = model_config("mfavb")["cluster_heads"]  # aligned after the contrastive epochs; LATEST says how well
    assert len(latest["metrics"]["head_agreement"]) == heads
    assert latest["metrics"]["head_agreement"][latest["metrics"]["reference_head"]] == 1.0
    alignment = load_model(real_feature_lake, latest).cluster_head.alignment
    assert all(sorted(row) == list(range(10)) for row in alignment.tolist())
    assert (alignment != torch.arange(10)).any(), "five heads from five random starts number their clusters alike"
    report = evaluate_checkpoint(real_feature_lake, latest, real_feature_lake.newest_files(FEATURES))
    assert report.samples == DIGITS
    assert report.rows[latest["model_version"]]["acc"] > 0.3, report  # chance is 0.1


def test_one_worker_run_repeats_with_its_seed(ray_session, real_feature_lake):
    """The seeded shuffle repeats only if Ray Data hands the table's rows over in the same order."""
    runs = [train(TrainSettings(real_feature_lake.uri, "ccmlp", clusters=10, epochs=2, batch_size=128, workers=1,
                                run=f"repeat-{attempt}", seed=3, self_label_epochs=1, evaluate=False))
            for attempt in "ab"]
    first, second = (latest["metrics"] for latest in runs)
    assert first["loss"] == second["loss"] and first["kept"] == second["kept"], (first, second)


def run_train_job(lake: str, run: str, epochs: int, log: Path) -> subprocess.Popen:
    """The train job in its own process group (with its own local Ray), output to ``log``."""
    command = [sys.executable, str(REPO / "jobs" / "train.py"), "--lake", lake, "--run", run,
               "--epochs", str(epochs), "--self-label-epochs", "1", "--batch-size", "128", "--clusters", "10"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_checkpoint(lake: Lake, run: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if lake.fs.glob(lake.path(MODELS, run, "checkpoint_*", "model.pt")):
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended before its first checkpoint:\n{log.read_text()}")
        time.sleep(0.5)
    raise AssertionError("no checkpoint within the timeout")


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, digits_features):
    lake = write_digits_feature_lake(digits_features, str(tmp_path / "lake"), shards=1)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = run_train_job(lake.uri, "resumable", 40, first_log)
    try:
        wait_for_checkpoint(lake, "resumable", first, first_log)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert lake.read_json(MODELS, "LATEST") is None, "LATEST must wait for a finished run"

    second = run_train_job(lake.uri, "resumable", 3, second_log)
    try:
        second.wait(timeout=400)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    output = second_log.read_text()
    assert second.returncode == 0, output
    assert "resumed run resumable after epoch" in output, output
    assert "epoch 1/4" not in output, output  # it did not start over
    assert "epoch 4/4 (self-labelling)" in output, output
    latest = lake.read_json(MODELS, "LATEST")
    assert latest["model_version"] == "resumable/epoch-3"
    with lake.fs.open(lake.path(latest["checkpoint"], "config.json")) as f:
        assert json.load(f)["clusters"] == 10
