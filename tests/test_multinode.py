"""The pipeline on a Ray cluster of three nodes (``ray.cluster_utils.Cluster``) and an s3:// lake.

The nodes run on this one machine, each with one CPU, its own object store and a custom
resource naming it. embed -> train -> infer -> refresh run once in-process (module fixture);
the tests read the lake from SeaweedFS and ask Ray's state API where the work ran. A local-folder
lake on this cluster must be refused: a worker on another machine would write its own disk.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict

import duckdb
import pytest

from conftest import REPO, TINY_ENCODER

pytestmark = pytest.mark.slow

NODES = ("head", "worker-1", "worker-2")
OBJECT_STORE_BYTES = 256 * 1024 * 1024
SAMPLES = 50
FIRST_SHARDS, NEW_SHARDS = 4, 2
CLUSTERS = 5


@pytest.fixture(scope="module")
def private_ray_tmpdir():
    """A short RAY_TMPDIR of our own: Ray writes the cluster's address to
    ``$RAY_TMPDIR/ray/ray_current_cluster``, where another ``ray.init()`` on this machine
    (other test runs) would find and join this cluster if it were the shared /tmp/ray."""
    saved = os.environ.get("RAY_TMPDIR")
    directory = tempfile.mkdtemp(prefix="rc-mn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    os.environ["RAY_TMPDIR"] = directory
    yield directory
    if saved is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = saved
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_env, private_ray_tmpdir):
    """Three one-CPU nodes, the driver connected to the head. ``s3_env`` is set first because
    the nodes' workers inherit the environment the nodes start in."""
    import ray
    from ray.cluster_utils import Cluster

    from rayclust.runtime import keep_idle_workers

    os.environ.pop("RAY_ADDRESS", None)
    keep_idle_workers()  # as the cluster configs start their nodes
    cluster = Cluster()
    try:
        for name in NODES:
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES, resources={f"node-{name}": 1},
                             **({"include_dashboard": True, "dashboard_port": free_port()} if name == "head" else {}))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_names() -> dict[str, str]:
    """Ray node id -> the name in NODES, from each node's custom resource."""
    import ray

    names = {}
    for node in ray.nodes():
        for name in NODES:
            if f"node-{name}" in node["Resources"]:
                names[node["NodeID"]] = name
    return names


def nodes_by_actor_class(dashboard: str) -> dict[str, set[str]]:
    """Actor class name -> names of the nodes its actors ran on (live and dead actors)."""
    from ray.util.state import list_actors

    names = node_names()
    placed: dict[str, set[str]] = defaultdict(set)
    for actor in list_actors(address=f"http://{dashboard}", limit=10_000, raise_on_missing_output=False):
        placed[actor.class_name].add(names.get(actor.node_id, actor.node_id or "?"))
    return placed


def nodes_of(placed: dict[str, set[str]], fragment: str) -> set[str]:
    return set().union(*[nodes for name, nodes in placed.items() if fragment in name])


@pytest.fixture(scope="module")
def raw(s3_server) -> str:
    """s3://BUCKET/multinode/raw/ with the first FIRST_SHARDS shards."""
    from rayclust.synthetic import write_synthetic_shards

    uri = f"s3://{s3_server.bucket}/multinode/raw"
    write_synthetic_shards(uri, FIRST_SHARDS, SAMPLES, classes=CLUSTERS, size=32, seed=1)
    return uri


@pytest.fixture(scope="module")
def pipeline(cluster, s3_server, raw) -> dict:
    from rayclust.features import embed
    from rayclust.labels import infer
    from rayclust.refresh import RefreshSettings, refresh
    from rayclust.synthetic import write_synthetic_shards
    from rayclust.training import TrainSettings, train

    root = f"{s3_server.bucket}/multinode"
    lake = f"s3://{root}/lake"
    embedded = embed(f"{raw}/part-{{000000..{FIRST_SHARDS - 1:06d}}}.tar", lake, TINY_ENCODER, views=2,
                     batch_size=32)
    # workers=2: one worker per one-CPU node (test_default_training_workers_fit_on_one_node: the default)
    latest = train(TrainSettings(lake, "ccmlp", clusters=CLUSTERS, epochs=1, self_label_epochs=1, batch_size=64,
                                 workers=2, run="multinode"))
    inferred = infer(lake, batch_size=64)
    write_synthetic_shards(raw, NEW_SHARDS, SAMPLES, classes=CLUSTERS, size=32, seed=1, first=FIRST_SHARDS)
    # every shard: those embed and infer did are adopted into the manifest, the new ones processed
    refreshed = refresh(RefreshSettings(f"{raw}/*.tar", lake, batch_size=32, infer_batch_size=64))
    return {"root": root, "lake": lake, "embedded": embedded, "latest": latest, "inferred": inferred,
            "refreshed": refreshed, "placed": nodes_by_actor_class(cluster.webui_url), "fs": s3_server.filesystem()}


def rows_by_shard(fs, root: str, table: str) -> dict[str, tuple[int, int]]:
    """shard -> (rows, distinct keys) of a lake table on S3, read with DuckDB through s3fs."""
    con = duckdb.connect()
    con.register_filesystem(fs)  # DuckDB's httpfs extension cannot be downloaded offline
    rows = con.execute(f"""
        SELECT shard, count(*), count(DISTINCT key)
        FROM read_parquet('s3://{root}/lake/{table}/*/*.parquet', hive_partitioning = true,
                          hive_types = {{'shard': VARCHAR}})
        GROUP BY shard""").fetchall()
    return {shard: (n, keys) for shard, n, keys in rows}


def test_every_sample_has_one_feature_row_and_one_label_row(pipeline):
    shards = {f"part-{i:06d}" for i in range(FIRST_SHARDS + NEW_SHARDS)}
    expected = {shard: (SAMPLES, SAMPLES) for shard in shards}
    assert pipeline["embedded"].samples == FIRST_SHARDS * SAMPLES and pipeline["embedded"].bad_samples == 0
    assert pipeline["inferred"].rows == FIRST_SHARDS * SAMPLES
    refreshed = pipeline["refreshed"]
    assert (refreshed.new, refreshed.adopted, refreshed.changed, refreshed.samples, dict(refreshed.failures)) == \
        (FIRST_SHARDS + NEW_SHARDS, FIRST_SHARDS, 0, NEW_SHARDS * SAMPLES, {})
    assert rows_by_shard(pipeline["fs"], pipeline["root"], "features") == expected
    assert rows_by_shard(pipeline["fs"], pipeline["root"], "labels") == expected


def test_labels_come_from_the_latest_model(pipeline):
    con = duckdb.connect()
    con.register_filesystem(pipeline["fs"])
    versions, low, high = con.execute(f"""
        SELECT list(DISTINCT model_version), min(cluster), max(cluster)
        FROM read_parquet('s3://{pipeline['root']}/lake/labels/*/*.parquet')""").fetchone()
    assert versions == [pipeline["latest"]["model_version"]] and versions[0].startswith("multinode/")
    assert 0 <= low <= high < CLUSTERS


def test_encoders_labelers_and_training_workers_ran_on_several_nodes(pipeline):
    placed = pipeline["placed"]
    # one-CPU nodes and one CPU per encoder: two encoders cannot share a node
    assert len(nodes_of(placed, "Embedder")) >= 2, placed
    assert nodes_of(placed, "Labeler"), placed  # a quarter CPU each: a pool that grows only when batches queue
    assert len(nodes_of(placed, "RayTrainWorker")) == 2, placed


def test_local_folder_lake_is_refused_on_a_multi_node_cluster(cluster, raw, tmp_path):
    lake = tmp_path / "lake"
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "embed.py"), "--shards", f"{raw}/part-000000.tar",
         "--lake", str(lake), "--encoder", TINY_ENCODER],
        env=env, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, done.stdout + done.stderr
    assert len(lines) == 1 and "local folder" in lines[0], done.stderr
    assert not list(lake.glob("features/**/*.parquet"))


def test_default_training_workers_fit_on_one_node(cluster):
    """Ray Train places each worker on one node, so a worker asking for more CPUs than any node
    has waits forever: jobs/train.py without --workers must plan workers that fit a node."""
    import ray
    from rayclust.training import plan_workers

    plan = plan_workers(None)
    largest = max(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"])
    assert plan.cpus_per_worker <= largest, f"{plan} on nodes of at most {largest} CPUs"
