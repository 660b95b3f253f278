"""The lake lock: exclusive, renewed, taken over only when its holder is gone or its lease ran out,
on a local folder and on a real S3 API (SeaweedFS)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

@pytest.fixture(params=["local", "s3"])
def empty_lake(request, tmp_path):
    from rayclust.lake import Lake

    if request.param == "local":
        return Lake.open(str(tmp_path / "lake"), create=True)
    server = request.getfixturevalue("s3_server")
    return Lake.open(f"s3://{server.bucket}/locks-{uuid.uuid4().hex[:8]}")


def test_lock_is_exclusive_until_released(empty_lake):
    from rayclust.lock import LakeLock, LakeLocked

    with LakeLock(empty_lake, "refresh"):
        with pytest.raises(LakeLocked, match=f"locked by refresh \\(pid {os.getpid()} "):
            LakeLock(empty_lake, "other").acquire()
    with LakeLock(empty_lake, "other") as lock:
        assert lock.took_over is None


def test_expired_lock_is_taken_over_once(empty_lake):
    from rayclust.lock import LOCK, LakeLock, LakeLocked, Lease

    expired = Lease("crashed", "refresh", "another-host", 4242, "2026-11-22T00:00:00+00:00",
                    "2026-11-22T00:05:00+00:00")
    empty_lake.fs.pipe_file(empty_lake.path(LOCK), expired.to_bytes())
    with LakeLock(empty_lake, "refresh") as lock:
        assert lock.took_over == expired
        with pytest.raises(LakeLocked):
            LakeLock(empty_lake, "refresh").acquire()


def test_holder_whose_lease_ran_out_loses_the_lock(empty_lake):
    from rayclust.lock import LakeLock, LakeLocked

    slow = LakeLock(empty_lake, "slow", ttl_s=0.5)
    slow.acquire()  # no renewal thread: as if the holder hung
    time.sleep(1.0)
    with LakeLock(empty_lake, "next") as next_holder:
        assert next_holder.took_over.job == "slow"
        slow.renew()
        with pytest.raises(LakeLocked, match="lost the lock"):
            slow.check()
        slow.release()  # must not delete the new holder's lock
        with pytest.raises(LakeLocked, match="locked by next"):
            LakeLock(empty_lake, "third").acquire()


def test_a_dead_holder_on_this_machine_is_stale_but_a_live_one_or_another_machines_is_not():
    from rayclust.lock import Lease, boot_id, process_start

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    future = "2999-01-01T00:00:00+00:00"
    here = dict(holder="h", job="embed", host="same-name", acquired_at=future, expires_at=future, boot_id=boot_id())
    assert Lease(pid=dead_pid, started="1", **here).stale()
    assert not Lease(pid=os.getpid(), started=process_start(os.getpid()), **here).stale()
    # the pid is alive but was reused by a process that started later than the holder
    assert Lease(pid=os.getpid(), started="1", **here).stale()
    # same host name, other machine or boot (containers share names): only the lease can tell
    elsewhere = {**here, "boot_id": "another-boot"}
    assert not Lease(pid=dead_pid, started="1", **elsewhere).stale()
