"""The README's cluster path: ``ray start --head``, then ``ray job submit --working-dir . -- python jobs/X.py``.

A head node runs as a subprocess (``ray start --head --block``, its own session, free ports, a
private RAY_TMPDIR) with token authentication on, as Ray's docs set it up: RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN in the environment of the head and of the ``ray job`` CLI. embed -> train -> infer
-> refresh (of one new shard) are submitted with the checkout as working dir against an s3:// lake
(SeaweedFS), once per module. The store's secret key then appears in no job's output, log or
metadata, no object of the lake (the lock while refresh holds it) and no file of the head's Ray.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from conftest import REPO, TINY_ENCODER, kill

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # setup runs four jobs in a row

RAY = str(Path(sys.executable).parent / "ray")
SHARDS, SAMPLES, CLUSTERS = 2, 50, 5
JOB_TIMEOUT_S = 600


@dataclass
class Head:
    process: subprocess.Popen
    dashboard: str  # http://127.0.0.1:PORT, the job server
    env: dict[str, str]
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env(token: str, tmpdir: str) -> dict[str, str]:
    """The test's environment (with the S3 endpoint and credentials) as a user's shell would have it:
    the venv's bin first on PATH (the job's ``python``), token auth on, no RAY_ADDRESS. RAY_TMPDIR
    is ours so that no other ``ray.init()`` on this machine finds this head in /tmp/ray. Idle
    workers are kept as the cluster configs' nodes keep them."""
    from rayclust.runtime import WORKER_IDLE_KILL_MS

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", RAY_TMPDIR=tmpdir,
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_idle_worker_killing_time_threshold_ms=WORKER_IDLE_KILL_MS)
    return env


def start_command() -> tuple[list[str], int]:
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port()}
    command = [RAY, "start", "--head", "--block", "--num-cpus=2", "--object-store-memory=300000000",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]
    return command, dashboard


def wait_for_job_server(head: Head, token: str, timeout_s: float = 180) -> None:
    request = urllib.request.Request(f"{head.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout_s
    while True:
        if head.process.poll() is not None:
            raise AssertionError(f"ray start exited with {head.process.returncode}:\n{head.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no job server at {head.dashboard} in {timeout_s:.0f}s:\n"
                                 f"{head.log.read_text()[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def head(s3_env, s3_server, tmp_path_factory):
    token = secrets.token_hex(32)
    tmpdir = tempfile.mkdtemp(prefix="rc-js-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = head_env(token, tmpdir)
    command, dashboard = start_command()
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    node = Head(process, f"http://127.0.0.1:{dashboard}", env, log)
    try:
        wait_for_job_server(node, token)
        yield node
    finally:
        kill(process)  # a test head keeps nothing worth a graceful stop (which takes half a minute)
        shutil.rmtree(tmpdir, ignore_errors=True)


def job_api(head: Head, path: str) -> dict:
    """GET the job server's REST API (``/api/jobs/...``) with the cluster's token."""
    request = urllib.request.Request(f"{head.dashboard}/api/jobs/{path}",
                                     headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def submit(head: Head, name: str, job: str, *flags: str) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir <checkout> -- python jobs/<job> ...``, waiting for the end."""
    submission = f"{name}-{secrets.token_hex(4)}"
    return subprocess.run(
        [RAY, "job", "submit", "--address", head.dashboard, "--submission-id", submission,
         "--working-dir", str(REPO), "--", "python", f"jobs/{job}", *flags],
        env=head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO)


def submission_id(done: subprocess.CompletedProcess) -> str:
    return done.args[done.args.index("--submission-id") + 1]


@pytest.fixture(scope="module")
def jobs(head, s3_server) -> dict:
    from rayclust.synthetic import write_synthetic_shards

    root = f"{s3_server.bucket}/jobsubmit"
    raw, lake = f"s3://{root}/raw", f"s3://{root}/lake"
    write_synthetic_shards(raw, SHARDS, SAMPLES, classes=CLUSTERS, size=32, seed=2)
    runs = {}
    for name, job, flags in [
        ("embed", "embed.py", ["--shards", f"{raw}/*.tar", "--lake", lake, "--encoder", TINY_ENCODER,
                               "--views", "2", "--batch-size", "32"]),
        ("train", "train.py", ["--lake", lake, "--clusters", str(CLUSTERS), "--epochs", "1",
                               "--self-label-epochs", "1", "--batch-size", "64", "--run", "submitted"]),
        ("infer", "infer.py", ["--lake", lake, "--batch-size", "64"]),
    ]:
        runs[name] = submit(head, name, job, *flags)
        if runs[name].returncode != 0:
            break  # the later jobs need this one's output
    fs, lock = s3_server.filesystem(), None
    if all(run.returncode == 0 for run in runs.values()):
        write_synthetic_shards(raw, 1, SAMPLES, classes=CLUSTERS, size=32, seed=2, first=SHARDS)
        with ThreadPoolExecutor(1) as pool:
            refresh = pool.submit(submit, head, "refresh", "refresh.py", "--shards", f"{raw}/*.tar", "--lake", lake)
            while lock is None and not refresh.done():
                lock = held(fs, f"{root}/lake/_lock")
            runs["refresh"] = refresh.result()
    return {"runs": runs, "root": root, "fs": fs, "lock": lock}


def held(fs, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        time.sleep(0.2)
        return None


def test_embed_train_infer_succeed_as_submitted_jobs(head, jobs):
    for name in ("embed", "train", "infer", "refresh"):
        done = jobs["runs"].get(name)
        assert done is not None and done.returncode == 0, done and (done.stdout + done.stderr)[-4000:]
        assert job_api(head, submission_id(done))["status"] == "SUCCEEDED"
    assert "embedded 100 samples from 2 shards" in jobs["runs"]["embed"].stdout
    assert "labelled 100 samples of 2 shards with submitted/" in jobs["runs"]["infer"].stdout
    assert jobs["lock"] is not None and b"refresh" in jobs["lock"], jobs["lock"]


def test_submitted_jobs_wrote_one_feature_and_one_label_row_per_sample(jobs):
    fs, root = jobs["fs"], jobs["root"]
    with fs.open(f"{root}/lake/models/LATEST") as f:
        latest = json.load(f)
    assert latest["run"] == "submitted" and fs.exists(f"{root}/lake/{latest['checkpoint']}/model.pt")
    con = duckdb.connect()
    con.register_filesystem(fs)  # DuckDB's httpfs extension cannot be downloaded offline
    for table in ("features", "labels"):
        counts = con.execute(f"""
            SELECT shard, count(*), count(DISTINCT key)
            FROM read_parquet('s3://{root}/lake/{table}/*/*.parquet', hive_partitioning = true,
                              hive_types = {{'shard': VARCHAR}})
            GROUP BY shard ORDER BY shard""").fetchall()
        assert counts == [(f"part-{i:06d}", SAMPLES, SAMPLES) for i in range(SHARDS + 1)], table
    versions = con.execute("SELECT list(DISTINCT model_version) "
                           f"FROM read_parquet('s3://{root}/lake/labels/*/*.parquet')")
    assert versions.fetchone()[0] == [latest["model_version"]]


def test_secrets_appear_in_no_job_output_log_metadata_lake_object_or_ray_file(head, jobs, s3_env):
    fs, root = jobs["fs"], jobs["root"]
    objects = {path: fs.cat_file(path) for path in fs.find(f"{root}/lake")}
    assert {"models/LATEST", "manifest/manifest.parquet"} <= {p.split("/lake/", 1)[1] for p in objects}
    assert any(p.endswith("/config.json") for p in objects)
    jobs_seen = {}
    for name, done in jobs["runs"].items():
        jobs_seen[f"output of {name}"] = (done.stdout + done.stderr).encode()
        jobs_seen[f"metadata of {name}"] = json.dumps(job_api(head, submission_id(done))).encode()
        jobs_seen[f"log of {name}"] = job_api(head, f"{submission_id(done)}/logs")["logs"].encode()
    ray_files = {str(p): p.read_bytes() for p in Path(head.env["RAY_TMPDIR"]).rglob("*")
                 if p.is_file() and not p.is_symlink()}
    assert any("/logs/" in p for p in ray_files), sorted(ray_files)[:20]
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    assert holding(secret, jobs_seen) == []
    assert holding(secret, {**objects, "_lock": jobs["lock"]}) == []
    assert holding(secret, ray_files) == []


def holding(secret: str, files: dict[str, bytes]) -> list[str]:
    return sorted(name for name, data in files.items() if secret.encode() in data)


def test_bad_flag_fails_the_job_with_one_error_line(head):
    done = submit(head, "bad-flag", "embed.py", "--shards", "s3://nowhere/x.tar", "--lake", "s3://nowhere/lake",
                  "--views", "abc")
    assert done.returncode != 0, done.stdout + done.stderr
    assert job_api(head, submission_id(done))["status"] == "FAILED"
    logs = job_api(head, f"{submission_id(done)}/logs")["logs"]
    errors = [line for line in logs.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--views" in errors[0], logs
    assert "Traceback" not in logs + done.stdout + done.stderr
