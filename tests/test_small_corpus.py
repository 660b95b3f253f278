"""Small corpora and tables without augmented views train with the defaults; a user error raised
on a Ray worker ends the job in one line. No ../shared data: scikit-learn's bundled digits."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest
import ray
from sklearn.datasets import load_digits

from rayclust.cli import user_error
from rayclust.errors import UserError
from rayclust.features import write_feature_arrays
from rayclust.labels import infer
from rayclust.lake import LABELS, Lake
from rayclust.synthetic import write_synthetic_shards
from rayclust.training import TrainSettings, fit_batch_size, train

from conftest import REPO

DIGITS_BATCH_MESSAGE = "batch size 256 -> 50 per worker: the feature table has 200 rows for 1 worker(s)"


def write_digits_lake(path, rows: int, views: int) -> Lake:
    """The first ``rows`` digits (64 pixels scaled to [0, 1]) as a feature table, with ``views`` noisy copies each."""
    digits = load_digits()
    clean = (digits.data[:rows] / 16).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.05, (rows, views, clean.shape[1])).astype(np.float32)
    lake = Lake.open(str(path), create=True)
    write_feature_arrays(lake, "digits", np.array([f"digit-{i}" for i in range(rows)]), digits.target[:rows],
                         clean, clean[:, None] + noise, "digits")
    return lake


@pytest.mark.parametrize("batch, explicit, rows, workers, clusters, fitted", [
    (256, False, 200, 1, 10, 50),  # four steps an epoch
    (256, False, 2000, 1, 10, 256),  # already four steps or more
    (256, False, 60, 1, 10, 20),  # four steps would be a batch of 15: two samples per cluster win
    (256, False, 200, 2, 10, 25),
    (64, True, 100, 1, 10, 64),  # explicit: kept while one batch fits
])
def test_batch_fits_the_table(batch, explicit, rows, workers, clusters, fitted):
    assert fit_batch_size(batch, explicit, rows, workers, clusters) == fitted


@pytest.mark.parametrize("batch, explicit, rows, workers, clusters, phrase", [
    (256, False, 19, 1, 10, "too few for 10 clusters"),
    (128, True, 200, 2, 10, "no full batch of 128"),
])
def test_a_batch_that_cannot_fit_is_refused(batch, explicit, rows, workers, clusters, phrase):
    with pytest.raises(UserError, match=phrase):
        fit_batch_size(batch, explicit, rows, workers, clusters)


def test_200_rows_train_with_the_default_batch_and_every_row_is_labelled(ray_session, tmp_path, capsys):
    lake = write_digits_lake(tmp_path / "lake", rows=200, views=2)
    latest = train(TrainSettings(lake.uri, "ccmlp", clusters=10, epochs=1, self_label_epochs=1, workers=1,
                                 run="small", evaluate=False))
    assert capsys.readouterr().out.count(DIGITS_BATCH_MESSAGE) == 1
    assert latest["model_version"] == "small/epoch-1"
    infer(lake.uri)
    labels = pads.dataset(lake.path(LABELS), filesystem=lake.arrow_fs, partitioning="hive").to_table()
    assert sorted(labels.column("key").to_pylist()) == sorted(f"digit-{i}" for i in range(200))


def test_a_table_without_views_trains_a_model_with_neighbours(ray_session, tmp_path):
    lake = write_digits_lake(tmp_path / "lake", rows=200, views=0)
    latest = train(TrainSettings(lake.uri, "ccmlp", clusters=10, epochs=1, self_label_epochs=1, workers=1,
                                 run="no-views", evaluate=False))
    assert latest["metrics"]["phase"] == "self-labelling"
    assert np.isfinite(latest["metrics"]["loss"])


def test_a_table_without_views_is_refused_for_a_model_without_neighbours(tmp_path):
    lake = write_digits_lake(tmp_path / "lake", rows=200, views=0)
    with pytest.raises(UserError, match="--views 0"):
        train(TrainSettings(lake.uri, "ccmlp", overrides={"neighbours": 0}))


def test_a_ray_task_s_user_error_is_found_behind_ray_s_wrapper(ray_session):
    @ray.remote
    def refuse() -> None:
        raise UserError("the task refused")

    with pytest.raises(Exception) as task:
        ray.get(refuse.remote())
    assert str(task.value) != "the task refused"  # Ray's wrapper: the remote traceback
    assert str(user_error(task.value)) == "the task refused"
    assert user_error(RuntimeError("a bug")) is None


RAY_PROCESS = re.compile(r"\((\w+ )?pid=\d+\)")  # a line a Ray worker or actor printed, forwarded by Ray
RAY_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) ")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def job_lines(stderr: str) -> list[str]:
    """What the job itself wrote on stderr: without Ray's log records and forwarded worker output,
    Python's warnings (and the source line they quote) or progress bars' cursor moves."""
    lines, warned = [], False
    for line in ANSI.sub("", stderr).replace("\r", "\n").splitlines():
        quotes_source = warned and line.startswith("  ")
        warned = "Warning: " in line
        if not (quotes_source or warned or not line.strip() or RAY_PROCESS.search(line)
                or RAY_LOG_RECORD.match(line)):
            lines.append(line)
    return lines


def test_a_user_error_on_a_ray_train_worker_ends_the_job_in_one_line(tmp_path):
    """An image model's samples are not counted on the driver: 20 images for a batch of 128 fail on
    the Ray Train worker, in the first epoch."""
    shards = write_synthetic_shards(str(tmp_path / "shards"), shards=1, per_shard=20)
    command = [sys.executable, str(REPO / "jobs" / "train.py"), "--lake", str(tmp_path / "lake"),
               "--model", "pyramid", "--shards", shards[0], "--epochs", "1", "--run", "too-few"]
    # Ray's workers import rayclust from this checkout, not from wherever it is installed
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 1, run.stderr
    assert job_lines(run.stderr) == ["error: no full batch of 128 samples per worker: lower --batch-size or --workers"], \
        run.stderr
    output = run.stdout + run.stderr
    assert "rayclust.errors.UserError" not in output, output  # its traceback: the driver's, a worker's, the controller's
    # Ray's own processes may log tracebacks of their own trouble, unrelated to the job's: Ray Train's controller
    # when a resource request times out on a loaded machine, its PlacementGroupCleaner where several local Rays run
    assert not [line for line in output.splitlines() if "Traceback" in line and not RAY_PROCESS.search(line)], output
