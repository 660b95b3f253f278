"""A lease on the lake: ``LAKE/_lock``, so that two refreshes never write the same lake at once.

The lock is a small JSON record (holder, job, host, boot_id, pid, started, acquired_at,
expires_at) that its holder renews while it runs; embed, infer and refresh all hold it while
they write. Taking it is a conditional create: S3 ``If-None-Match: *``
(AWS S3 and SeaweedFS honour it), and on a local lake a read-decide-write under ``flock``
of ``LAKE/_lock.guard``. A record whose lease has expired, or whose holder ran on this very
machine since its last boot (same ``boot_id``, not merely the same host name, which containers
share) and is no longer running (its pid is gone or belongs to a process started later), is stale
and is taken over with a conditional replace (S3 ``If-Match`` on the
ETag read), so exactly one contender wins. A holder that cannot renew (someone took over
after its lease ran out) is told by ``check()`` and stops before its next commit. A job whose
object store stopped answering leaves its lock: releasing it would wait out the retries again.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from botocore.exceptions import BotoCoreError

from rayclust.errors import UserError
from rayclust.lake import Lake, is_local, store_unreachable

LOCK = "_lock"
DEFAULT_TTL_S = 300


class LakeLocked(UserError):
    """Another job holds the lake's lock, or this job lost it."""


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def boot_id() -> str:
    """This machine's boot, from the kernel (unique per boot and per machine); "" where unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot ("" if it does not exist or is unknown):
    with the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@dataclass(frozen=True)
class Lease:
    holder: str
    job: str
    host: str
    pid: int
    acquired_at: str
    expires_at: str
    boot_id: str = ""
    started: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Lease | None":
        """The lease in ``data``, or None if it is not one (a stale or foreign file)."""
        try:
            lease = cls(**json.loads(data))
            datetime.datetime.fromisoformat(lease.expires_at)
            return lease
        except (ValueError, TypeError):
            return None

    def expires(self) -> datetime.datetime:
        return datetime.datetime.fromisoformat(self.expires_at)

    def stale(self) -> bool:
        if utc_now() >= self.expires():
            return True
        if not self.boot_id or self.boot_id != boot_id():
            return False  # another machine (or an unknown one): only its lease can tell
        return not pid_alive(self.pid) or (bool(self.started) and process_start(self.pid) != self.started)

    def describe(self) -> str:
        left = (self.expires() - utc_now()).total_seconds()
        return (f"{self.job} (pid {self.pid} on {self.host}, since {self.acquired_at}, "
                f"lease expires in {max(left, 0):.0f}s)")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class LocalStore:
    """Compare-and-swap on a file: every read-decide-write runs under an flock of a guard file."""

    def __init__(self, lake: Lake):
        self.path = lake.path(LOCK)
        self.guard = lake.path(f"{LOCK}.guard")

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        with open(self.guard, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write(self, data: bytes) -> None:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def read(self) -> tuple[bytes, bytes] | None:
        """(content, token) of the lock, or None if there is none."""
        with self._guarded():
            data = self._read()
        return None if data is None else (data, data)

    def create(self, data: bytes) -> tuple[bool, bytes]:
        with self._guarded():
            if self._read() is not None:
                return False, b""
            self._write(data)
            return True, data

    def replace(self, data: bytes, token: bytes) -> tuple[bool, bytes]:
        with self._guarded():
            if self._read() != token:
                return False, b""
            self._write(data)
            return True, data

    def delete(self, token: bytes) -> None:
        with self._guarded():
            if self._read() == token:
                os.remove(self.path)


class S3Store:
    """Compare-and-swap with S3 conditional requests; the token is the object's ETag."""

    def __init__(self, lake: Lake):
        self.fs = lake.fs
        self.bucket, self.key = lake.path(LOCK).split("/", 1)

    def read(self) -> tuple[bytes, str] | None:
        try:
            # ETag first, then the body: if it changed in between, the stale ETag fails our write.
            etag = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            return self.fs.cat_file(f"{self.bucket}/{self.key}"), etag
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> tuple[bool, str]:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, token: str) -> tuple[bool, str]:
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except FileNotFoundError:
            pass
        except OSError as exn:
            if not precondition_failed(exn):  # someone else's lock now: leave it
                raise

    def _put(self, data: bytes, **condition: str) -> tuple[bool, str]:
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except FileExistsError:  # s3fs's name for a failed If-None-Match
            return False, ""
        except OSError as exn:
            if precondition_failed(exn):
                return False, ""
            raise
        return True, response["ETag"]


def precondition_failed(exn: OSError) -> bool:
    """412 (the condition did not hold) or 409 (a concurrent conditional write won)."""
    response = getattr(exn.__cause__, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status in (409, 412) or response.get("Error", {}).get("Code") in ("PreconditionFailed",
                                                                             "ConditionalRequestConflict")


def store_for(lake: Lake) -> LocalStore | S3Store:
    if is_local(lake.fs):
        lake.fs.makedirs(lake.root, exist_ok=True)
        return LocalStore(lake)
    if "s3" in lake.fs.protocol:
        return S3Store(lake)
    raise UserError(f"cannot lock {lake.uri}: the lake must be a local folder or s3://")


class LakeLock:
    """``with LakeLock(lake, "refresh"):`` holds the lake's lock, renewing its lease in a thread."""

    def __init__(self, lake: Lake, job: str, ttl_s: float = DEFAULT_TTL_S):
        self.lake, self.job, self.ttl_s = lake, job, ttl_s
        self.store = store_for(lake)
        self.holder = uuid.uuid4().hex
        self.token = None
        self.took_over: Lease | None = None
        self.lost = False
        self._stop = threading.Event()
        self._mutex = threading.Lock()

    def _lease(self) -> bytes:
        now = utc_now()
        return Lease(self.holder, self.job, socket.gethostname(), os.getpid(), self.acquired_at,
                     (now + datetime.timedelta(seconds=self.ttl_s)).isoformat(), boot_id(),
                     process_start(os.getpid())).to_bytes()

    def acquire(self) -> None:
        self.acquired_at = utc_now().isoformat()
        for _ in range(5):
            done, self.token = self.store.create(self._lease())
            if done:
                return
            current = self.store.read()
            if current is None:
                continue  # released meanwhile: try to create again
            data, token = current
            held = Lease.from_bytes(data)
            if held is not None and not held.stale():
                raise LakeLocked(f"{self.lake.uri} is locked by {held.describe()}; "
                                 f"not starting {self.job} (a crashed holder's lock is taken over "
                                 f"once its lease expires)")
            done, self.token = self.store.replace(self._lease(), token)
            if done:
                self.took_over = held
                return
        raise LakeLocked(f"{self.lake.uri}: could not take the lock (other jobs keep taking it)")

    def renew(self) -> None:
        with self._mutex:
            if self.lost:
                return
            done, token = self.store.replace(self._lease(), self.token)
            if done:
                self.token = token
            else:
                self.lost = True

    def check(self) -> None:
        """Raise if this job no longer holds the lock; call before each commit."""
        if self.lost:
            raise LakeLocked(f"lost the lock on {self.lake.uri} (lease not renewed in time, "
                             f"another job took it over); stopping before the next commit")

    def release(self) -> None:
        self._stop.set()
        with self._mutex:
            if not self.lost:
                self.store.delete(self.token)

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except (OSError, BotoCoreError):  # s3fs passes botocore's connection errors on as they are
                pass  # a blip: the next renewal retries well before the lease runs out

    def __enter__(self) -> "LakeLock":
        self.acquire()
        threading.Thread(target=self._renew_until_released, name="lake-lock", daemon=True).start()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is not None and store_unreachable(exc):
            # releasing would wait out the retries again; the lease lets the next job take over
            self._stop.set()
            return
        self.release()
