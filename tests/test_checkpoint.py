"""Checkpoints cut short or damaged: infer names the file in one line and exits non-zero, a run
does not resume from one, and LATEST never moves to one.

One CC-MLP is trained for an epoch on scikit-learn's digits (module fixture); each test damages
a copy of what it needs.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, start_job

ROWS = 900
CLUSTERS = 10


def truncated(path: Path) -> None:
    """An upload or copy cut off half-way."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupted(path: Path) -> None:
    """4 KiB of garbage in the middle, among the tensors' bytes: the zip still opens."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": truncated, "corrupted": corrupted}


def train_digits(lake: Path, run: str, epochs: int = 1) -> dict:
    from rayclust.training import TrainSettings, train

    return train(TrainSettings(str(lake), "ccmlp", clusters=CLUSTERS, epochs=epochs, self_label_epochs=0,
                               batch_size=128, run=run, evaluate=False))


@pytest.fixture(scope="module")
def trained_lake(ray_session, digits_features, tmp_path_factory) -> Path:
    from rayclust.features import write_feature_arrays
    from rayclust.lake import Lake

    root = tmp_path_factory.mktemp("checkpoints") / "lake"
    rows = {name: digits_features[name][:ROWS] for name in ("keys", "labels", "clean", "views")}
    write_feature_arrays(Lake.open(str(root), create=True), "digits-00", rows["keys"], rows["labels"], rows["clean"],
                         rows["views"], "digits-pixels")
    train_digits(root, "whole")
    return root


def latest_of(lake: Path) -> dict:
    return json.loads((lake / "models" / "LATEST").read_text())


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_infer_names_a_damaged_model_in_one_line(trained_lake, tmp_path, damage):
    lake = tmp_path / "lake"
    shutil.copytree(trained_lake, lake)
    before = (lake / "models" / "LATEST").read_bytes()
    model = lake / latest_of(lake)["checkpoint"] / "model.pt"
    DAMAGE[damage](model)
    log = tmp_path / "infer.log"
    process = start_job([sys.executable, str(REPO / "jobs" / "infer.py"), "--lake", str(lake)], log)
    assert process.wait(timeout=300) != 0
    output = log.read_text()
    assert output.startswith("error: ") and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1 and str(model) in output and "damaged" in output, output
    assert (lake / "models" / "LATEST").read_bytes() == before
    assert not (lake / "labels").exists() and not (lake / "_lock").exists()


def test_latest_moves_only_to_a_checkpoint_that_loads(trained_lake, tmp_path):
    from rayclust.errors import UserError
    from rayclust.lake import Lake
    from rayclust.training import publish_latest

    lake = tmp_path / "lake"
    shutil.copytree(trained_lake, lake)
    before = (lake / "models" / "LATEST").read_bytes()
    checkpoint = lake / latest_of(lake)["checkpoint"]
    cut = lake / "models" / "cut" / checkpoint.name
    shutil.copytree(checkpoint, cut)
    truncated(cut / "model.pt")
    with pytest.raises(UserError) as refused:
        publish_latest(Lake.open(str(lake)), "cut", str(cut), {"epoch": 0}, CLUSTERS)
    message = str(refused.value)
    assert "\n" not in message and str(cut / "model.pt") in message and "LATEST unchanged" in message, message
    assert (lake / "models" / "LATEST").read_bytes() == before


def test_a_run_does_not_resume_from_a_damaged_checkpoint_nor_move_latest(trained_lake, tmp_path):
    """A run trained further (the same --run, more epochs) resumes from its last checkpoint: cut
    short, that stops the run with one line naming the file, and LATEST stays as it was."""
    from rayclust.cli import user_error

    lake = tmp_path / "lake"
    shutil.copytree(trained_lake, lake)  # Ray Train's run state names its checkpoints relative to the run
    before = (lake / "models" / "LATEST").read_bytes()
    model = lake / latest_of(lake)["checkpoint"] / "model.pt"
    truncated(model)
    with pytest.raises(Exception) as failed:
        train_digits(lake, "whole", epochs=2)
    problem = user_error(failed.value)
    assert problem is not None, failed.value
    assert "\n" not in str(problem) and f"resuming from {model}" in str(problem), problem
    assert (lake / "models" / "LATEST").read_bytes() == before
    assert [p for p in model.parent.parent.glob("checkpoint_*") if p.is_dir()] == [model.parent]
