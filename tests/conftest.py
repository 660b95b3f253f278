"""Shared fixtures and builders: one local Ray per test module, a SeaweedFS S3 server, the real
data the tests build for themselves (drawn JPEG shards, scikit-learn's digits as features: no test
reads ../shared, which holds the benchmarks' data), and the helpers that start, watch and kill
jobs and read their output. Test modules import from here, never from each other."""
from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from rayclust.seaweed import SeaweedS3, free_port_pair

REPO = Path(__file__).resolve().parents[1]
# Ray Train's controller polls its workers every 2 s by default, and a run ends only at the poll after its
# last report: the suite's many short runs wait less (the jobs, the test's Ray and the clusters inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
DRAWN_SHARDS = 4
DRAWN_PER_SHARD = 100
DIGITS_VIEWS = 3
TINY_ENCODER = "open_clip:rayclust-tiny-vit:none"


@pytest.fixture(scope="module")
def ray_session(s3_env):
    """One local Ray per test module: starting Ray costs seconds on 2 cores, so a module's tests
    share it, but a module that breaks its Ray does not take the next module's down with it.
    (The one such breakage seen, the driver losing its GCS subscription, came from a JVM started
    in the test process beside the driver: Spark now runs in a process of its own, see
    tests/spark_read_lake.py.)

    Ray's workers inherit the driver's environment when Ray starts, so the test S3
    endpoint and credentials (``s3_env``) are set first; no S3 server is started here.
    """
    import ray

    from rayclust.runtime import keep_idle_workers

    os.environ.pop("RAY_ADDRESS", None)
    keep_idle_workers()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def drawn_shards(tmp_path_factory) -> Path:
    """``drawn-000000.tar`` ... : WebDataset shards of 100 drawn 32-px JPEGs of 10 classes each
    (``rayclust.synthetic``; members ``.cls``, ``.jpg``, ``.json``, keys ``drawn000000_00000`` ...)."""
    from rayclust.synthetic import write_synthetic_shards

    folder = tmp_path_factory.mktemp("drawn-shards")
    write_synthetic_shards(str(folder), DRAWN_SHARDS, DRAWN_PER_SHARD, prefix="drawn")
    return folder


@pytest.fixture(scope="session")
def digits_features() -> dict[str, np.ndarray]:
    """scikit-learn's 1,797 digits as a real feature table with known labels: ``clean`` [N, 64]
    (pixels scaled to [0, 1]) and ``views`` [N, 3, 64], each view the image shifted by up to a
    pixel with a little noise; ``keys`` and ``labels`` beside them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images / 16.0
    rng = np.random.default_rng(0)
    views = np.stack([shifted_with_noise(images, rng) for _ in range(DIGITS_VIEWS)], axis=1)
    return {"keys": np.array([f"digit-{i:05d}" for i in range(len(images))]), "labels": digits.target,
            "clean": images.reshape(len(images), -1).astype(np.float32),
            "views": views.reshape(len(images), DIGITS_VIEWS, -1).astype(np.float32)}


def shifted_with_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shifts = rng.integers(-1, 2, size=(len(images), 2))
    moved = np.stack([np.roll(image, tuple(shift), axis=(0, 1)) for image, shift in zip(images, shifts)])
    return np.clip(moved + rng.normal(0, 0.05, moved.shape), 0, 1)


class CreatesFile:
    """Unpickling this creates ``path`` (as ``open(path, 'w')`` does): proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


S3_BUCKET = "rayclust-test"
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
S3_ENV_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


@pytest.fixture(scope="session")
def s3_env():
    """AWS_* variables for the session's SeaweedFS S3 server (``s3_server``), set in os.environ.

    Session-wide and set before ``ray_session`` starts Ray (it depends on this fixture), because
    Ray workers inherit the driver's environment at ``ray.init``: set later, workers would not
    see it. Only the endpoint and credentials are chosen here; the server starts when a test
    asks for ``s3_server``. The endpoint is local, so no test can reach a real S3 by mistake.
    """
    port = free_port_pair()
    values = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": f"rayclust{secrets.token_hex(4)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
        "AWS_REGION": "us-east-1",
    }
    saved = {name: os.environ.get(name) for name in (*S3_ENV, *S3_ENV_CLEARED)}
    for name in S3_ENV_CLEARED:
        os.environ.pop(name, None)
    os.environ.update(values)
    yield {**values, "port": port}
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server(s3_env, tmp_path_factory) -> SeaweedS3:
    """A real S3 API: ``weed mini`` (SeaweedFS) on free local ports, with bucket S3_BUCKET.

    The credentials in ``s3_env`` are given to weed as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
    which it makes its one (admin) identity: other keys and anonymous requests are refused.
    """
    with seaweed_running(tmp_path_factory.mktemp("seaweedfs"), s3_env["port"], S3_BUCKET) as server:
        yield server


@pytest.fixture(scope="session")
def drawn_shards_on_s3(s3_server, drawn_shards) -> str:
    """``s3://BUCKET/drawn``: the first two drawn shards, uploaded once; tests only read them."""
    fs = s3_server.filesystem()
    for name in ("drawn-000000.tar", "drawn-000001.tar"):
        fs.put_file(str(drawn_shards / name), f"{s3_server.bucket}/drawn/{name}")
    return f"s3://{s3_server.bucket}/drawn"


@contextmanager
def seaweed_running(folder: Path, port: int, bucket: str) -> Iterator[SeaweedS3]:
    """A started SeaweedFS S3 server, stopped on leaving; a server that cannot start fails the test."""
    server = SeaweedS3(folder, port, bucket)
    try:
        server.start()
    except RuntimeError as exn:
        pytest.fail(str(exn))
    try:
        yield server
    finally:
        server.stop()


def job_env() -> dict[str, str]:
    """The test's environment without RAY_ADDRESS: a job run as a subprocess starts a local Ray of its own."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def start_job(command: list[str], log: Path) -> subprocess.Popen:
    """A job in its own process group (so a kill takes its Ray too), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(command, env=job_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


class JobEnded(AssertionError):
    """The job ended before the condition a test waited for."""


def wait_until(condition, process: subprocess.Popen, log: Path, what: str, timeout: float = 300,
               every: float = 0.2):
    """The condition's first truthy value, polled ``every`` seconds while the job runs."""
    deadline = time.time() + timeout
    while not (seen := condition()):
        if process.poll() is not None:
            raise JobEnded(f"the job ended (status {process.returncode}) before {what}:\n{log.read_text()}")
        if time.time() > deadline:
            raise AssertionError(f"no {what} within {timeout}s:\n{log.read_text()}")
        time.sleep(every)
    return seen


def kill(process: subprocess.Popen) -> None:
    """The job and every process it started, dead on return: a Ray worker outside the job's process
    group would otherwise finish (and publish) what it was doing after the job is gone."""
    import psutil

    try:
        started = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    for child in started:
        with suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(started, timeout=30)
    process.wait()


def job_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / script), *args]


def run_train_job(lake: str, run: str, epochs: int, log: Path) -> subprocess.Popen:
    """The train job on a digits lake (10 clusters, one self-labelling epoch) in its own process
    group with its own local Ray, output to ``log``."""
    return start_job(job_command("train.py", "--lake", lake, "--run", run, "--epochs", str(epochs),
                                 "--self-label-epochs", "1", "--batch-size", "128", "--clusters", "10"), log)


def recorded_epochs(lake, run: str) -> list[int]:
    """The epochs whose checkpoints Ray Train has recorded (its checkpoint manager's snapshot): a
    restart or a rerun resumes after the newest. (A checkpoint uploaded but not yet recorded is not used.)"""
    from rayclust.lake import MODELS

    try:
        snapshot = lake.read_json(MODELS, run, "checkpoint_manager_snapshot.json") or {}
    except ValueError:  # being written
        return []
    return [result["metrics"]["epoch"] for result in snapshot.get("checkpoint_results", [])]


DIGITS_PER_SHARD = 900


def write_digits_feature_lake(data: dict[str, np.ndarray], lake_uri: str, shards: int):
    """The first ``shards`` x 900 of ``digits_features`` as a feature table (the last shard holds what is left)."""
    from rayclust.features import write_feature_arrays
    from rayclust.lake import Lake

    lake = Lake.open(lake_uri)
    for s in range(shards):
        rows = slice(s * DIGITS_PER_SHARD, (s + 1) * DIGITS_PER_SHARD)
        write_feature_arrays(lake, f"digits-{s:02d}", data["keys"][rows], data["labels"][rows],
                             data["clean"][rows], data["views"][rows], "digits-pixels")
    return lake


RAY_PROCESS = re.compile(r"\((\w+ )?pid=\d+\)")  # a line a Ray worker or actor printed, forwarded by Ray
RAY_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) ")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def job_lines(output: str) -> list[str]:
    """What the job itself wrote: without Ray's log records and forwarded worker output, Python's
    warnings (and the source line they quote) or progress bars' cursor moves."""
    lines, warned = [], False
    for line in ANSI.sub("", output).replace("\r", "\n").splitlines():
        quotes_source = warned and line.startswith("  ")
        warned = "Warning: " in line
        if not (quotes_source or warned or not line.strip() or RAY_PROCESS.search(line)
                or RAY_LOG_RECORD.match(line)):
            lines.append(line)
    return lines
