"""The write path end to end, with the jobs run as users run them (subprocesses, each with its own
local Ray) on a local lake of drawn JPEG shards (``rayclust.synthetic``; no ../shared):

1. a refresh started while an embed holds the lake is turned away with one line, the embed
   finishes, and every shard has exactly its rows (the other order: tests/test_refresh.py);
2. an embed killed as soon as its first shard is published keeps that shard, and run again does
   only the rest;
3. a shard cut off in the middle of a member (a partial upload) is recorded as damaged, with the
   samples it still yielded.
"""
from __future__ import annotations

import json
import re
import subprocess
import tarfile
from pathlib import Path

import duckdb
import pytest

from conftest import TINY_ENCODER, job_command, job_env, kill, start_job, wait_until

pytestmark = pytest.mark.slow

SAMPLES = 40
LAST = 61  # parts 6..LAST are embedded by the run that is killed: enough that they finish in several waves
CUT = "part-000009"
CUT_IN_SAMPLE = 25  # the cut falls inside this sample's image


def lock_pid(lake: Path) -> int | None:
    try:
        return json.loads((lake / "_lock").read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def rows_by_shard(lake: Path, table: str) -> dict[str, tuple[int, int]]:
    """shard -> (rows, distinct keys) of a table, as DuckDB reads it."""
    query = (f"SELECT shard, count(*), count(DISTINCT key) FROM read_parquet('{lake}/{table}/*/*.parquet', "
             f"hive_partitioning = true, hive_types = {{'shard': VARCHAR}}) GROUP BY shard")
    return {shard: (n, keys) for shard, n, keys in duckdb.execute(query).fetchall()}


def cut_mid_member(source: Path, target: Path, sample: int) -> None:
    """``source`` cut off half-way through the image of its ``sample``-th sample."""
    with tarfile.open(source) as tar:
        image = [m for m in tar.getmembers() if m.name.endswith(".jpg")][sample]
    target.write_bytes(source.read_bytes()[: image.offset_data + image.size // 2])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from rayclust.synthetic import write_synthetic_shards

    folder = tmp_path_factory.mktemp("write-path-source")
    write_synthetic_shards(str(folder), LAST + 1, SAMPLES, classes=4)
    whole = folder / f"{CUT}.tar"
    cut_mid_member(whole, whole, CUT_IN_SAMPLE)
    return folder


def shards(source: Path, first: int, last: int) -> str:
    return str(source / f"part-{{{first:06d}..{last:06d}}}.tar")


@pytest.fixture(scope="module")
def trained_lake(ray_session, source, tmp_path_factory) -> Path:
    from rayclust.features import embed
    from rayclust.training import TrainSettings, train

    lake = tmp_path_factory.mktemp("write-path") / "lake"
    embed(shards(source, 0, 1), str(lake), TINY_ENCODER, views=1, batch_size=64)
    train(TrainSettings(str(lake), "ccmlp", clusters=4, epochs=1, self_label_epochs=0, batch_size=32, run="tiny",
                        evaluate=False))
    return lake


def second_job_while_first_holds_the_lake(lake: Path, first: list[str], second: list[str], log: Path) -> dict:
    holder = start_job(first, log)
    try:
        wait_until(lambda: lock_pid(lake) == holder.pid, holder, log, "the lock")
        refused = subprocess.run(second, env=job_env(), capture_output=True, text=True, timeout=300)
        holder.wait(timeout=600)
    finally:
        kill(holder)
    return {"holder": holder, "log": log.read_text(), "refused": refused}


@pytest.fixture(scope="module")
def embed_then_refresh(trained_lake, source) -> dict:
    lake = trained_lake
    return second_job_while_first_holds_the_lake(
        lake, job_command("embed.py", "--shards", shards(source, 2, 4), "--lake", str(lake),
                          "--encoder", TINY_ENCODER, "--views", "1"),
        job_command("refresh.py", "--shards", shards(source, 0, 5), "--lake", str(lake)), lake.parent / "embed.log")


def assert_refused_in_one_line(outcome: dict, holder_job: str) -> None:
    refused = outcome["refused"]
    assert refused.returncode == 1, refused.stderr
    lines = [line for line in refused.stderr.strip().splitlines() if not line.startswith("20")]  # Ray's start-up
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert re.match(rf"error: .* is locked by {holder_job} \(pid {outcome['holder'].pid} ", lines[0]), lines[0]


def test_refresh_started_during_an_embed_is_turned_away_and_the_embed_finishes(embed_then_refresh, trained_lake):
    assert_refused_in_one_line(embed_then_refresh, "embed")
    assert embed_then_refresh["holder"].returncode == 0, embed_then_refresh["log"]
    features = rows_by_shard(trained_lake, "features")
    assert {s: features.get(s) for s in (f"part-{i:06d}" for i in range(5))} == {
        f"part-{i:06d}": (SAMPLES, SAMPLES) for i in range(5)}


@pytest.fixture(scope="module")
def killed_and_rerun(embed_then_refresh, trained_lake, source) -> dict:
    lake, log = trained_lake, trained_lake.parent / "killed.log"
    command = job_command("embed.py", "--shards", shards(source, 6, LAST), "--lake", str(lake),
                          "--encoder", TINY_ENCODER, "--views", "1", "--batch-size", "16")
    first = start_job(command, log)
    killed = {f"part-{i:06d}" for i in range(6, LAST + 1)}
    published = lambda: {p.parent.name.split("=")[1]  # noqa: E731
                         for p in lake.glob("features/shard=*/*.parquet")} & killed
    try:
        wait_until(published, first, log, "a published shard")
    finally:
        kill(first)
    at_kill = published()
    rerun = subprocess.run(command, env=job_env(), capture_output=True, text=True, timeout=600)
    return {"at_kill": at_kill, "rerun": rerun, "lake": lake}


def test_an_embed_killed_midway_keeps_its_finished_shards_and_a_rerun_does_the_rest(killed_and_rerun):
    at_kill, rerun = killed_and_rerun["at_kill"], killed_and_rerun["rerun"]
    shards = LAST - 5
    assert 1 <= len(at_kill) < shards, at_kill
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (f"{shards} shards into {killed_and_rerun['lake']}: {shards - len(at_kill)} to embed, "
            f"{len(at_kill)} already done") in rerun.stdout, rerun.stdout
    features = rows_by_shard(killed_and_rerun["lake"], "features")
    whole = [f"part-{i:06d}" for i in range(6, LAST + 1) if f"part-{i:06d}" != CUT]
    assert {s: features[s] for s in whole} == {s: (SAMPLES, SAMPLES) for s in whole}


def test_a_shard_cut_mid_member_is_recorded_as_damaged_with_the_samples_it_yielded(killed_and_rerun):
    lake = killed_and_rerun["lake"]
    assert rows_by_shard(lake, "features")[CUT] == (CUT_IN_SAMPLE, CUT_IN_SAMPLE)  # the samples before the cut
    errors = dict(duckdb.execute(f"SELECT key, reason FROM read_parquet('{lake}/errors/shard={CUT}/*.parquet')")
                  .fetchall())
    cut_sample = f"part000009_{CUT_IN_SAMPLE:05d}"  # its .cls came before the cut, its image did not
    assert errors.keys() == {"__shard__", cut_sample}, errors
    assert errors["__shard__"].startswith("damaged tar: ") and errors[cut_sample].startswith("no image member")
