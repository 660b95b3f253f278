"""Faults, with the jobs run as users run them (subprocesses, each with its own local Ray):

1. a Ray Train worker SIGKILLed mid-run: Ray Train restarts the run from its last checkpoint
   (FailureConfig) and it finishes;
2. the object store (a SeaweedFS of this module's own, on a port of its own) stopped for 20 s in
   the middle of embed, of training (a checkpoint is being written) and of infer, then restarted
   on the same data: each job finishes with every row, its clients having retried with backoff;
3. the store stopped for good in the middle of a refresh: one line naming the store, a non-zero
   exit within the retry policy's time, and nothing recorded as done that was not published.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest

from conftest import (TINY_ENCODER, job_command, job_env, job_lines, kill, recorded_epochs, run_train_job,
                      seaweed_running, wait_until, write_digits_feature_lake)
from rayclust.lake import MODELS
from rayclust.seaweed import SeaweedS3, free_port_pair

pytestmark = pytest.mark.slow

OUTAGE_S = 20
BUCKET = "rayclust-faults"
LAKE = f"s3://{BUCKET}/lake"
SHARDS = 6  # embedded (with one outage), trained on and labelled (with one outage each)
NEW_SHARDS = 2  # then refreshed while the store stays down
SAMPLES = 40
CLUSTERS = 4
TRAIN_EPOCHS = 8
GIVE_UP_S = 150  # the retry policy's longest wait (docs/lake.md), with room for a loaded machine
KILLED_RUN_EPOCHS = 10
PIPELINE_STARTS = "Starting execution of Dataset"  # Ray Data's log line: the job's tasks start reading and writing


# --- a worker killed mid-run -------------------------------------------------------------------

def training_worker(job: subprocess.Popen) -> psutil.Process:
    """The job's Ray Train worker process (its process title names the actor)."""
    for process in psutil.Process(job.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                return process
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("the training job has no RayTrainWorker process")


def test_a_killed_training_worker_restarts_the_run_from_its_last_checkpoint(tmp_path, digits_features):
    lake = write_digits_feature_lake(digits_features, str(tmp_path / "lake"), shards=1)
    log = tmp_path / "train.log"
    job = run_train_job(lake.uri, "killed", KILLED_RUN_EPOCHS, log)
    try:
        recorded = max(wait_until(lambda: recorded_epochs(lake, "killed"), job, log, "a recorded checkpoint"))
        training_worker(job).send_signal(signal.SIGKILL)
        job.wait(timeout=600)
    finally:
        kill(job)
    output = log.read_text()
    assert job.returncode == 0, output
    resumed = re.search(r"resumed run killed after epoch (\d+)", output)
    assert resumed and int(resumed[1]) >= recorded, output
    since = output[resumed.end():]
    assert f"epoch {int(resumed[1]) + 1}/{KILLED_RUN_EPOCHS + 1} " in since, output  # and one self-labelling epoch
    assert "epoch 1/" not in since, output  # the restarted run did not start over
    assert lake.read_json(MODELS, "LATEST")["model_version"] == f"killed/epoch-{KILLED_RUN_EPOCHS + 1}"


# --- the object store down for a while, then for good ----------------------------------------

@pytest.fixture(scope="module")
def store(s3_env, tmp_path_factory) -> SeaweedS3:
    """This module's own SeaweedFS (the session's ``s3_server`` stays up for the other modules),
    with the session's credentials; the jobs are pointed at it."""
    with seaweed_running(tmp_path_factory.mktemp("faults-s3"), free_port_pair(), BUCKET) as server:
        yield server


def start_job(store: SeaweedS3, script: str, log: Path, *args: str, **env_vars: str) -> subprocess.Popen:
    """``jobs/<script>`` against ``store``, in its own process group, output to ``log``."""
    env = {**job_env(), "AWS_ENDPOINT_URL": store.endpoint, **env_vars}
    with open(log, "w") as out:
        # --verbose: the tests wait for Ray Data's own line that the pipeline started (PIPELINE_STARTS)
        return subprocess.Popen(job_command(script, *args, "--verbose"), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(job: subprocess.Popen, timeout: float = 600) -> None:
    try:
        job.wait(timeout=timeout)
    finally:
        kill(job)


def listed(store: SeaweedS3, pattern: str) -> list[str]:
    return store.filesystem().glob(f"{BUCKET}/lake/{pattern}")


def outage(store: SeaweedS3, job: subprocess.Popen) -> bool:
    """Stop the store for OUTAGE_S (it stops answering at once; its shutdown takes seconds more),
    then start it again on the same data and port; whether the job was still running when it
    came back."""
    back = time.monotonic() + OUTAGE_S
    store.stop()
    time.sleep(max(0.0, back - time.monotonic()))
    store.start()
    return job.poll() is None


def rows_by_shard(store: SeaweedS3, table: str) -> dict[str, tuple[int, int]]:
    """shard -> (rows, distinct keys) of a table of the lake, all files of each partition read."""
    rows = pads.dataset(f"{BUCKET}/lake/{table}", filesystem=store.filesystem(), partitioning="hive").to_table(
        columns=["shard", "key"])
    counts = rows.group_by("shard").aggregate([("key", "count"), ("key", "count_distinct")])
    return {shard: (n, keys) for shard, n, keys in zip(*(counts.column(c).to_pylist()
                                                         for c in ("shard", "key_count", "key_count_distinct")))}


def every_sample_once(shards: int) -> dict[str, tuple[int, int]]:
    return {f"part-{i:06d}": (SAMPLES, SAMPLES) for i in range(shards)}


@pytest.fixture(scope="module")
def raw(store, tmp_path_factory) -> str:
    """SHARDS + NEW_SHARDS drawn JPEG shards on the store, the new ones under a name of their own."""
    from rayclust.synthetic import write_synthetic_shards

    folder = tmp_path_factory.mktemp("faults-shards")
    write_synthetic_shards(str(folder), SHARDS + NEW_SHARDS, SAMPLES, classes=CLUSTERS)
    fs = store.filesystem()
    for shard in sorted(folder.glob("*.tar")):
        fs.put_file(str(shard), f"{BUCKET}/raw/{shard.name}")
    return f"s3://{BUCKET}/raw"


def outage_once_started(store: SeaweedS3, job: subprocess.Popen, log: Path) -> dict:
    """The store down for OUTAGE_S from the moment the job's pipeline starts: its tasks read,
    write and publish into the outage."""
    try:
        wait_until(lambda: PIPELINE_STARTS in log.read_text(), job, log, "the pipeline")
        running = outage(store, job)
    finally:
        finish(job)
    return {"job": job, "log": log.read_text(), "running": running}


@pytest.fixture(scope="module")
def embed_outage(store, raw, tmp_path_factory) -> dict:
    log = tmp_path_factory.mktemp("faults-embed") / "embed.log"
    job = start_job(store, "embed.py", log, "--shards", f"{raw}/part-{{000000..{SHARDS - 1:06d}}}.tar",
                    "--lake", LAKE, "--encoder", TINY_ENCODER, "--views", "1", "--batch-size", "16")
    return outage_once_started(store, job, log)


def test_embed_rides_out_a_store_outage_with_every_row(embed_outage, store):
    assert embed_outage["running"], "the embed finished before the store came back"
    assert embed_outage["job"].returncode == 0, embed_outage["log"]
    assert rows_by_shard(store, "features") == every_sample_once(SHARDS)
    assert not listed(store, "_staging/**/*.parquet") and not listed(store, "_lock")


def unrecorded_checkpoint(store: SeaweedS3) -> bool:
    """Whether the run has a checkpoint on the store that Ray Train has not recorded yet: its
    controller records it (in its snapshot, dropping older ones) when it next polls the workers."""
    fs, run = store.filesystem(), f"{BUCKET}/lake/models/outage"
    written = {path.rsplit("/", 2)[-2] for path in fs.glob(f"{run}/checkpoint_*/model.pt")}
    try:
        snapshot = json.loads(fs.cat(f"{run}/checkpoint_manager_snapshot.json"))
    except FileNotFoundError:  # none recorded yet
        snapshot = {}
    return bool(written - {result["checkpoint_dir_name"] for result in snapshot.get("checkpoint_results", [])})


@pytest.fixture(scope="module")
def train_outage(store, embed_outage, tmp_path_factory) -> dict:
    """A training run whose store stops as soon as a checkpoint is on it but not yet recorded: that
    checkpoint is committed into the outage (and the next epoch reads its features into it). Ray
    Train records it at its controller's next poll of the workers: the default interval (2 s, not
    the suite's 0.25 s) leaves the time to see it unrecorded."""
    log = tmp_path_factory.mktemp("faults-train") / "train.log"
    job = start_job(store, "train.py", log, "--lake", LAKE, "--run", "outage", "--clusters", str(CLUSTERS),
                    "--epochs", str(TRAIN_EPOCHS), "--self-label-epochs", "0", "--batch-size", "32",
                    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="2")
    try:
        wait_until(lambda: unrecorded_checkpoint(store), job, log, "a checkpoint being written")
        running = outage(store, job)
    finally:
        finish(job)
    return {"job": job, "log": log.read_text(), "running": running}


def test_training_rides_out_a_store_outage_while_writing_a_checkpoint(train_outage, store):
    assert train_outage["running"], "training finished before the store came back"
    assert train_outage["job"].returncode == 0, train_outage["log"]
    assert "resumed run" not in train_outage["log"], train_outage["log"]  # no worker failed
    fs = store.filesystem()
    latest = json_of(fs, f"{BUCKET}/lake/models/LATEST")
    assert latest["model_version"] == f"outage/epoch-{TRAIN_EPOCHS}"
    assert fs.exists(f"{BUCKET}/lake/{latest['checkpoint']}/model.pt")
    assert json_of(fs, f"{BUCKET}/lake/{latest['checkpoint']}/config.json")["clusters"] == CLUSTERS


def json_of(fs, path: str) -> dict:
    with fs.open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def infer_outage(store, train_outage, tmp_path_factory) -> dict:
    """Reading features, loading the model, writing and publishing labels all meet the outage."""
    log = tmp_path_factory.mktemp("faults-infer") / "infer.log"
    return outage_once_started(store, start_job(store, "infer.py", log, "--lake", LAKE, "--batch-size", "16"), log)


def test_infer_rides_out_a_store_outage_with_every_row(infer_outage, store):
    assert infer_outage["running"], "infer finished before the store came back"
    assert infer_outage["job"].returncode == 0, infer_outage["log"]
    assert rows_by_shard(store, "labels") == every_sample_once(SHARDS)


@pytest.fixture(scope="module")
def store_gone(store, raw, infer_outage, tmp_path_factory) -> dict:
    """A refresh (of the NEW_SHARDS; the others are adopted, embed and infer did them) whose store
    stops for good as its pipeline starts; it comes back once the job has ended, to look at what
    the job left."""
    log = tmp_path_factory.mktemp("faults-refresh") / "refresh.log"
    job = start_job(store, "refresh.py", log, "--shards", f"{raw}/*.tar", "--lake", LAKE)
    try:
        wait_until(lambda: PIPELINE_STARTS in log.read_text(), job, log, "the pipeline")
        store.stop()
        stopped = time.monotonic()
        job.wait(timeout=GIVE_UP_S + 60)
        gave_up_s = time.monotonic() - stopped
    finally:
        kill(job)
        store.start()
    return {"job": job, "log": log.read_text(), "gave_up_s": gave_up_s}


def test_a_store_that_stays_down_ends_a_refresh_in_one_line_naming_it(store_gone, store):
    job, output = store_gone["job"], store_gone["log"]
    assert job.returncode == 1, output
    assert store_gone["gave_up_s"] < GIVE_UP_S, store_gone["gave_up_s"]
    lines = job_lines(output)
    assert "Traceback" not in "\n".join(lines), output
    assert lines[-1].startswith(f"error: the object store at {store.endpoint} does not answer"), output


def test_a_store_that_stays_down_leaves_nothing_recorded_as_done_that_is_not(store_gone, store):
    from rayclust.manifest import MANIFEST_SCHEMA

    recorded = pads.dataset(f"{BUCKET}/lake/manifest", filesystem=store.filesystem(),
                            schema=MANIFEST_SCHEMA).to_table(columns=["shard", "samples"]).to_pylist()
    assert {row["shard"] for row in recorded} == set(every_sample_once(SHARDS)), recorded  # adopted, not the new
    assert all(row["samples"] == SAMPLES for row in recorded), recorded
