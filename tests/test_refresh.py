"""Refresh: crash safety, the lake lock, new shards only, drift; and the lake read by DuckDB and Spark.

One local scenario runs once (module fixtures), on four 100-sample shards copied from the drawn
JPEG shards (``part-000001`` also holds one sample without an image):
1. embed ``part-000000`` and train a tiny model in-process (LATEST);
2. ``jobs/refresh.py`` over parts 0-2 as a subprocess with its own Ray, SIGKILLed as soon as it
   stages features or records a shard (mid-write: shards it finished by then stay, the rest are
   redone);
3. run again; while it holds the lock an embed starts and must be turned away (an embed holding
   the lake turns a refresh away: tests/test_write_path.py);
4. in-process refreshes: part-000003 new (the rest skipped), then nothing new, then changed.
The lake is then copied to SeaweedFS, LATEST moves to a new model version, parts 2-3 are
refreshed there and ``infer`` relabels everything. The tests read what landed.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from conftest import REPO, TINY_ENCODER, JobEnded, job_command, job_env, kill, start_job, wait_until

pytestmark = pytest.mark.slow

SAMPLES = 100
SHARDS = [f"part-{i:06d}" for i in range(4)]
NO_IMAGE_KEY = "zz_no_image"
CLUSTERS = 5
KILL_ATTEMPTS = 3
RAY_DATA_INFO = ("Starting execution of Dataset", "Execution plan of Dataset", "Running Dataset", "execution finished")


# --- building shards and running the job -----------------------------------------------------

def cut_shard(source: Path, target: Path, samples: int, extra: dict[str, bytes] | None = None) -> None:
    """The first ``samples`` samples of a shard, byte for byte, plus an optional extra sample."""
    keys: set[str] = set()
    with tarfile.open(source) as src, tarfile.open(target, "w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src:
            key = member.name.split(".", 1)[0]
            if key not in keys and len(keys) == samples:
                break
            keys.add(key)
            dst.addfile(member, src.extractfile(member))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def refresh_command(pattern: str, lake: str) -> list[str]:
    return job_command("refresh.py", "--shards", pattern, "--lake", lake)


def start_refresh(pattern: str, lake: str, log: Path) -> subprocess.Popen:
    return start_job(refresh_command(pattern, lake), log)


def lock_pid(lake: Path) -> int | None:
    try:
        return json.loads((lake / "_lock").read_text())["pid"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def count_by_shard(glob: str) -> dict[str, tuple[int, int]]:
    """shard -> (rows, distinct keys) of a table, read with DuckDB."""
    rows = duckdb.execute(f"SELECT shard, count(*), count(DISTINCT key) FROM read_parquet('{glob}', "
                          "hive_partitioning = true) GROUP BY shard").fetchall()
    return {shard: (n, keys) for shard, n, keys in rows}


# --- the scenario ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tmp_path_factory, drawn_shards) -> Path:
    folder = tmp_path_factory.mktemp("refresh-source")
    for i, name in enumerate(SHARDS):
        extra = {f"{NO_IMAGE_KEY}.cls": b"3"} if i == 1 else None
        cut_shard(drawn_shards / f"drawn-{i:06d}.tar", folder / f"{name}.tar", SAMPLES, extra)
    return folder


@pytest.fixture(scope="module")
def trained_lake(ray_session, source, tmp_path_factory) -> Path:
    from rayclust.features import embed
    from rayclust.training import TrainSettings, train

    lake = tmp_path_factory.mktemp("refresh") / "lake"
    embed(str(source / f"{SHARDS[0]}.tar"), str(lake), TINY_ENCODER, views=2, batch_size=64)
    train(TrainSettings(str(lake), "mfavb", clusters=CLUSTERS, epochs=1, batch_size=64, run="tiny",
                        self_label_epochs=1))
    return lake


def killed_mid_way(lake: Path, pattern: str, log: Path) -> tuple[subprocess.Popen, dict]:
    """A refresh SIGKILLed while it writes, and what the lake held then. A staged piece lives a
    moment (until its shard is published) and a shard's manifest part until the refresh ends:
    either proves the pipeline is writing. On a fast machine three 100-sample shards can be written
    between two polls; then the lake is put back as it was and the refresh started again."""
    mid_way = lambda: (list(lake.glob("_staging/*/features/*/*.parquet"))  # noqa: E731
                       + list((lake / "manifest").glob("*-part-*.parquet")))
    before = lake.with_name("lake-before-refresh")
    shutil.copytree(lake, before)
    for attempt in range(1, KILL_ATTEMPTS + 1):
        job = start_refresh(pattern, str(lake), log)
        try:
            seen = wait_until(mid_way, job, log, "staged features or a recorded shard", every=0.02)
        except JobEnded:
            if attempt == KILL_ATTEMPTS:
                raise
            shutil.rmtree(lake)
            shutil.copytree(before, lake)
            continue
        finally:
            kill(job)
        return job, {"mid_way": seen, "attempts": attempt,
                     "manifest": (lake / "manifest" / "manifest.parquet").exists(),
                     "recorded": len(list((lake / "manifest").glob("*-part-*.parquet")))}


@pytest.fixture(scope="module")
def crash_and_rerun(trained_lake, source) -> dict:
    lake, logs = trained_lake, trained_lake.parent
    pattern = str(source / "part-00000{0..2}.tar")
    first, at_kill = killed_mid_way(lake, pattern, logs / "first.log")

    second = start_refresh(pattern, str(lake), logs / "second.log")
    try:
        wait_until(lambda: lock_pid(lake) == second.pid, second, logs / "second.log", "the lock")
        embed = job_command("embed.py", "--shards", str(source / f"{SHARDS[3]}.tar"), "--lake", str(lake),
                            "--encoder", TINY_ENCODER, "--views", "2")
        third = subprocess.run(embed, env=job_env(), capture_output=True, text=True, timeout=300)
        second.wait(timeout=400)
    finally:
        kill(second)
    return {"lake": lake, "first": first, "at_kill": at_kill, "second": second,
            "second_log": (logs / "second.log").read_text(), "third": third}


@pytest.fixture(scope="module")
def incremental(crash_and_rerun, source) -> dict:
    from rayclust.refresh import RefreshSettings, refresh

    lake = str(crash_and_rerun["lake"])
    pattern = str(source / "*.tar")
    one_new = refresh(RefreshSettings(pattern, lake))
    nothing_new = refresh(RefreshSettings(pattern, lake))
    forced = refresh_with_new_copy(source, lake)
    return {"lake": crash_and_rerun["lake"], "one_new": one_new, "nothing_new": nothing_new, "forced": forced,
            "rerun": (3 - crash_and_rerun["at_kill"]["recorded"], rerun_labelled(crash_and_rerun))}


def refresh_with_new_copy(source: Path, lake: str):
    """A changed shard (rewritten: new mtime) refreshed with drift limits of zero: any shift is drift."""
    from rayclust.refresh import RefreshSettings, refresh

    shard = source / f"{SHARDS[3]}.tar"
    shard.write_bytes(shard.read_bytes())
    os.utime(shard, (time.time() + 5, time.time() + 5))
    return refresh(RefreshSettings(str(source / "*.tar"), lake, max_confidence_drop=0.0, max_cluster_shift=0.0))


# --- crash safety and the lock ----------------------------------------------------------------

def test_killed_refresh_run_again_leaves_one_row_per_good_sample(crash_and_rerun):
    lake, at_kill = crash_and_rerun["lake"], crash_and_rerun["at_kill"]
    assert crash_and_rerun["first"].returncode == -signal.SIGKILL
    assert at_kill["mid_way"] and not at_kill["manifest"], "the kill was not mid-way"
    assert "refresh summary" not in (lake.parent / "first.log").read_text()
    assert crash_and_rerun["second"].returncode == 0, crash_and_rerun["second_log"]
    good = {name: (SAMPLES, SAMPLES) for name in SHARDS[:3]}
    assert count_by_shard(f"{lake}/features/*/*.parquet") == good
    assert count_by_shard(f"{lake}/labels/*/*.parquet") == good
    assert count_by_shard(f"{lake}/errors/*/*.parquet") == {SHARDS[1]: (1, 1)}
    unmatched = duckdb.execute(f"""
        SELECT count(*) FROM read_parquet('{lake}/features/*/*.parquet') f
        FULL JOIN read_parquet('{lake}/labels/*/*.parquet') l USING (key)
        WHERE f.key IS NULL OR l.key IS NULL""").fetchone()[0]
    assert unmatched == 0
    assert not list(lake.glob("_staging/*")), "staging left behind"
    assert not (lake / "_lock").exists(), "lock not released"


def test_rerun_took_over_the_killed_runs_lock_and_recorded_every_shard(crash_and_rerun):
    lake, log = crash_and_rerun["lake"], crash_and_rerun["second_log"]
    assert f"took over the stale lock of refresh (pid {crash_and_rerun['first'].pid}" in log, log
    manifest = pq.read_table(lake / "manifest" / "manifest.parquet").to_pylist()
    assert [(m["shard"], m["samples"], m["bad_samples"]) for m in manifest] == [
        (SHARDS[0], SAMPLES, 0), (SHARDS[1], SAMPLES, 1), (SHARDS[2], SAMPLES, 0)]
    assert {m["model_version"] for m in manifest} == {"tiny/epoch-2"}
    assert all(m["size"] > 0 and m["mtime"] is not None and m["etag"] is None for m in manifest)
    # the shards the killed run had finished are not redone: recorded in the manifest, or adopted
    # (published, but killed before its manifest row)
    adopted = int(re.search(r"adopted +(\d+) ", log).group(1))
    left = 3 - crash_and_rerun["at_kill"]["recorded"] - adopted
    assert re.search(r"shards seen +3\n", log) and rerun_labelled(crash_and_rerun) == left * SAMPLES, log


def test_a_job_without_verbose_prints_its_own_lines_and_none_of_rays(crash_and_rerun):
    """(With ``--verbose`` Ray Data's lines show: tests/test_faults.py's jobs wait for one of them.)"""
    log = crash_and_rerun["second_log"]
    assert "refresh summary" in log and "took over the stale lock" in log, log
    assert not [line for line in log.splitlines() if "\tINFO " in line], log
    assert not [phrase for phrase in RAY_DATA_INFO if phrase in log], log
    assert "NumPy array is not writable" not in log, log  # torch's warning from the encoder actors


def rerun_labelled(crash_and_rerun: dict) -> int:
    return int(re.search(r"samples labelled +(\d+) ", crash_and_rerun["second_log"]).group(1))


def test_an_embed_started_while_a_refresh_runs_exits_with_one_line(crash_and_rerun):
    third, holder = crash_and_rerun["third"], crash_and_rerun["second"].pid
    assert third.returncode == 1, third.stderr
    lines = [line for line in third.stderr.strip().splitlines() if not line.startswith("20")]  # Ray's start-up
    assert len(lines) == 1 and "Traceback" not in third.stderr, third.stderr
    assert lines[0].startswith("error: ") and f"is locked by refresh (pid {holder} " in lines[0], lines[0]


# --- incremental work and drift -----------------------------------------------------------------

def test_refresh_processes_only_the_new_shard(incremental):
    one_new, lake = incremental["one_new"], incremental["lake"]
    assert (one_new.seen, one_new.new, one_new.changed, one_new.skipped) == (4, 1, 0, 3)
    assert one_new.samples == SAMPLES and not one_new.failures
    assert count_by_shard(f"{lake}/labels/*/*.parquet")[SHARDS[3]] == (SAMPLES, SAMPLES)
    assert len(list(lake.glob(f"features/shard={SHARDS[0]}/*.parquet"))) == 1


def test_refresh_with_nothing_new_does_no_work(incremental):
    nothing = incremental["nothing_new"]
    assert (nothing.seen, nothing.new, nothing.changed, nothing.skipped, nothing.samples) == (4, 0, 0, 4, 0)
    assert "nothing new was labelled" in str(nothing)


def test_drift_is_judged_against_the_models_earlier_labels(incremental, crash_and_rerun):
    drift = incremental["one_new"].drift
    assert drift.judged, str(drift)
    # the baseline is kept from the first refresh that had labels of this model outside its new
    # shards: the rerun's, if the killed run had finished a shard, else this one's (parts 0-2)
    outside_rerun = 3 * SAMPLES - rerun_labelled(crash_and_rerun)
    assert drift.baseline.samples == (outside_rerun or 3 * SAMPLES) and drift.new.samples == SAMPLES
    assert drift.baseline.model_version == "tiny/epoch-2"
    assert 0.0 <= drift.cluster_shift <= 1.0 and abs(sum(drift.new.cluster_fractions) - 1) < 1e-5
    assert "drift:" in str(incremental["one_new"]) and "cluster sizes" in str(drift)
    assert incremental["one_new"].exit_code(fail_on_drift=True) == (3 if drift.detected else 0)


def test_drift_limits_apply_to_confidence_drop_and_total_variation():
    from rayclust.drift import Drift, LabelStats

    before = LabelStats("m", 1000, 0.80, [0.25, 0.25, 0.25, 0.25])
    same = LabelStats("m", 500, 0.78, [0.30, 0.20, 0.25, 0.25])
    collapsed = LabelStats("m", 500, 0.79, [0.70, 0.10, 0.10, 0.10])
    unsure = LabelStats("m", 500, 0.60, [0.25, 0.25, 0.25, 0.25])
    assert Drift(before, same, 0.1, 0.25).cluster_shift == pytest.approx(0.05)
    assert not Drift(before, same, 0.1, 0.25).detected
    assert Drift(before, collapsed, 0.1, 0.25).cluster_shift == pytest.approx(0.45)
    assert Drift(before, collapsed, 0.1, 0.25).detected
    assert Drift(before, unsure, 0.1, 0.25).confidence_drop == pytest.approx(0.2)
    assert Drift(before, unsure, 0.1, 0.25).detected
    assert not Drift(before, LabelStats("m", 99, 0.1, [1, 0, 0, 0]), 0.1, 0.25).judged  # too few samples


def test_changed_shard_is_reprocessed_and_zero_limits_flag_drift(incremental):
    forced = incremental["forced"]
    assert (forced.new, forced.changed, forced.skipped) == (0, 1, 3)
    assert forced.drift.detected and "DRIFT DETECTED" in str(forced)
    assert forced.exit_code(fail_on_drift=True) == 3 and forced.exit_code(fail_on_drift=False) == 0
    assert count_by_shard(f"{incremental['lake']}/features/*/*.parquet")[SHARDS[3]] == (SAMPLES, SAMPLES)


def test_each_finished_refresh_left_a_record_for_the_report(incremental):
    from rayclust.lake import Lake
    from rayclust.refresh_history import read_refresh_history

    history = read_refresh_history(Lake.open(str(incremental["lake"])))
    # the killed run left none; then the run again (new: what the killed one had not recorded), one
    # new shard, nothing new, the changed shard
    rerun_new, rerun_labelled = incremental["rerun"]
    assert [(r.new, r.changed, r.samples) for r in history] == [
        (rerun_new, 0, rerun_labelled), (1, 0, SAMPLES), (0, 0, 0), (0, 1, SAMPLES)]
    assert [r.drift_detected for r in history] == [False, incremental["one_new"].drift.detected, False, True]
    forced = incremental["forced"].drift
    assert history[-1].cluster_shift == pytest.approx(forced.cluster_shift)
    assert history[-1].mean_confidence == pytest.approx(forced.new.mean_confidence)
    assert {r.model_version for r in history} == {"tiny/epoch-2"} and not any(r.failed for r in history)


def test_every_label_row_carries_the_model_version(incremental):
    versions = duckdb.execute(f"""SELECT DISTINCT model_version FROM
        read_parquet('{incremental['lake']}/labels/*/*.parquet')""").fetchall()
    assert versions == [("tiny/epoch-2",)]


# --- the same on S3 -----------------------------------------------------------------------------

NEW_VERSION = "retrained/epoch-0"


@pytest.fixture(scope="module")
def s3_refreshed(incremental, source, s3_server) -> dict:
    """The local lake copied to the bucket (less parts 2-3's features), a new LATEST published,
    parts 2-3 refreshed there, labels read, then everything relabelled by ``infer``."""
    from rayclust.labels import infer
    from rayclust.lake import Lake
    from rayclust.refresh import RefreshSettings, refresh
    from rayclust.training import publish_latest

    fs, bucket = s3_server.filesystem(), s3_server.bucket
    local = incremental["lake"]
    for path in local.rglob("*"):
        relative = path.relative_to(local).as_posix()
        if path.is_file() and relative.split("/")[0] in ("models", "features", "labels"):
            if not relative.startswith((f"features/shard={SHARDS[2]}", f"features/shard={SHARDS[3]}")):
                fs.put_file(str(path), f"{bucket}/refresh-lake/{relative}")
    for name in SHARDS[2:]:
        fs.put_file(str(source / f"{name}.tar"), f"{bucket}/refresh-raw/{name}.tar")
    lake = Lake.open(f"s3://{bucket}/refresh-lake")
    old = json.loads((local / "models" / "LATEST").read_text())
    # A new model version: the same weights published under a new run, as a retraining would.
    publish_latest(lake, "retrained", lake.path(old["checkpoint"]), {"epoch": 0}, CLUSTERS)
    report = refresh(RefreshSettings(f"s3://{bucket}/refresh-raw/*.tar", lake.uri))
    versions = labels_by_version(s3_server.filesystem(), f"{bucket}/refresh-lake")
    relabelled = infer(lake.uri, evaluate=False)
    return {"report": report, "versions_after_refresh": versions, "relabelled": relabelled, "lake": lake.uri,
            "root": f"{bucket}/refresh-lake", "fs": s3_server.filesystem()}


def labels_by_version(fs, root: str) -> dict[str, set[str]]:
    """model_version -> shards whose labels carry it."""
    rows = pq.ParquetDataset(f"{root}/labels", filesystem=fs).read(columns=["model_version", "shard"]).to_pylist()
    versions: dict[str, set[str]] = {}
    for row in rows:
        versions.setdefault(row["model_version"], set()).add(str(row["shard"]))
    return versions


def test_refresh_on_s3_commits_each_shard_once(s3_refreshed):
    report, fs, root = s3_refreshed["report"], s3_refreshed["fs"], s3_refreshed["root"]
    assert (report.seen, report.new, report.samples) == (2, 2, 2 * SAMPLES) and not report.failures
    for table in ("features", "labels"):
        files = fs.glob(f"{root}/{table}/shard={SHARDS[2]}/*.parquet")
        assert len(files) == 1, files
    assert not fs.exists(f"{root}/_lock")
    assert not [f for f in fs.find(f"{root}/_staging") if f.endswith(".parquet")], "staging left behind"
    manifest = pq.read_table(f"{root}/manifest/manifest.parquet", filesystem=fs).to_pylist()
    assert [m["shard"] for m in manifest] == SHARDS[2:]
    assert all(m["etag"] and m["uri"].startswith("s3://") and m["model_version"] == NEW_VERSION for m in manifest)


def test_new_latest_labels_new_shards_and_infer_relabels_the_rest(s3_refreshed):
    assert s3_refreshed["versions_after_refresh"] == {NEW_VERSION: set(SHARDS[2:]), "tiny/epoch-2": set(SHARDS[:2])}
    assert "no baseline" in str(s3_refreshed["report"].drift)  # nothing else carries the new version yet
    relabelled = s3_refreshed["relabelled"]  # the refreshed shards already carry the new model's labels
    assert (relabelled.rows, relabelled.shards, relabelled.skipped) == (2 * SAMPLES, 2, 2)
    assert labels_by_version(s3_refreshed["fs"], s3_refreshed["root"]) == {NEW_VERSION: set(SHARDS)}


# --- the lake contract: DuckDB and Spark read the tables as written -------------------------------

LABELS_SQL = """
    SELECT l.shard, l.key, l.cluster, l.confidence, l.model_version, l.labeled_at, f.label, f.embedding
    FROM read_parquet('{lake}/labels/**/*.parquet', hive_partitioning = true) l
    JOIN read_parquet('{lake}/features/**/*.parquet', hive_partitioning = true) f USING (key)
"""


def check_duckdb_join(con: duckdb.DuckDBPyConnection, lake: str, shards: int, in_manifest: int) -> None:
    query = LABELS_SQL.format(lake=lake)
    rows = con.execute(f"SELECT count(*), count(DISTINCT key), count(DISTINCT shard), min(cluster), "
                       f"max(cluster), min(len(embedding)) FROM ({query})").fetchone()
    assert rows[0] == rows[1] == shards * SAMPLES
    assert rows[2] == shards and 0 <= rows[3] <= rows[4] < CLUSTERS and rows[5] == 64
    types = {name: kind for name, kind, *_ in con.execute(f"DESCRIBE {query}").fetchall()}
    assert types == {"shard": "VARCHAR", "key": "VARCHAR", "cluster": "INTEGER", "confidence": "FLOAT",
                     "model_version": "VARCHAR", "labeled_at": "TIMESTAMP WITH TIME ZONE", "label": "BIGINT",
                     "embedding": "FLOAT[]"}
    manifest = con.execute(f"SELECT count(*), sum(samples) FROM read_parquet('{lake}/manifest/*.parquet')").fetchone()
    assert manifest == (in_manifest, in_manifest * SAMPLES)


def test_duckdb_joins_labels_and_features_locally(incremental):
    check_duckdb_join(duckdb.connect(), str(incremental["lake"]), len(SHARDS), in_manifest=len(SHARDS))


def test_duckdb_joins_labels_and_features_on_s3(s3_refreshed):
    # httpfs is not bundled with DuckDB and cannot be downloaded offline: DuckDB reads s3://
    # through the lake's own fsspec (s3fs) filesystem, registered with DuckDB.
    con = duckdb.connect()
    con.register_filesystem(s3_refreshed["fs"])
    check_duckdb_join(con, f"s3://{s3_refreshed['root']}", len(SHARDS), in_manifest=2)


@pytest.fixture(scope="module")
def spark_seen(incremental, s3_refreshed, tmp_path_factory) -> dict:
    """What Spark saw of the local lake (``local``) and of the bucket's (``bucket``), read in one Spark
    process of its own (tests/spark_read_lake.py). Spark's own S3 connector (s3a) needs hadoop-aws and
    AWS SDK jars from Maven Central, which this machine cannot reach, so Spark reads a byte-for-byte
    copy of the bucket's lake objects (``copy``)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs a Java runtime (17): no java on PATH and no JAVA_HOME")
    try:
        import pyspark  # noqa: F401  (in the dev extra; installed here if a venv predates that)
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "pyspark"],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"pyspark is not installed and pip could not install it: {done.stderr[-300:]}")
    copy = tmp_path_factory.mktemp("spark") / "lake-from-s3"
    s3_refreshed["fs"].get(f"{s3_refreshed['root']}/", str(copy), recursive=True)
    local = str(incremental["lake"])
    done = subprocess.run([sys.executable, str(REPO / "tests" / "spark_read_lake.py"), local, str(copy)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    return {"local": seen[local], "bucket": seen[str(copy)], "copy": copy}


def check_spark_join(seen: dict, shards: int) -> None:
    assert seen["label_types"] == {"key": "string", "source": "string", "cluster": "int", "confidence": "float",
                                   "distance": "float", "model_version": "string", "labeled_at": "timestamp",
                                   "duplicate_of": "string", "write_id": "string", "shard": "string"}
    assert seen["feature_types"]["embedding"] == "array<float>"
    assert seen["feature_types"]["thumbnail"] == "binary" and seen["feature_types"]["source"] == "string"
    assert seen["feature_types"]["views"] == "array<array<float>>"
    assert seen["joined_rows"] == seen["joined_keys"] == shards * SAMPLES
    assert seen["joined_shards"] == shards
    assert set(seen["manifest_columns"]) >= {"shard", "uri", "size", "etag", "mtime", "samples"}


def test_spark_joins_labels_and_features_locally(spark_seen):
    check_spark_join(spark_seen["local"], len(SHARDS))


def test_spark_reads_the_objects_in_the_bucket(spark_seen):
    assert len(list(spark_seen["copy"].glob("labels/shard=*/*.parquet"))) == len(SHARDS)
    check_spark_join(spark_seen["bucket"], len(SHARDS))
