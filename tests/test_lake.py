"""The lake (rayclust.lake) on a real S3 API (SeaweedFS ``weed mini``): the tables embed -> train ->
infer write there, as pyarrow and DuckDB read them.

The flow runs once (module fixture) on two drawn JPEG shards uploaded to ``s3://BUCKET/drawn/``;
the tests then check what landed in ``s3://BUCKET/lake``. The same on a local lake:
tests/test_features.py.
"""
from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import TINY_ENCODER

SAMPLES = 100  # per drawn shard
CLUSTERS = 10


@pytest.fixture(scope="module")
def s3_pipeline(s3_server, drawn_shards_on_s3, ray_session) -> dict:
    from rayclust.features import embed
    from rayclust.labels import infer
    from rayclust.training import TrainSettings, train

    lake = f"s3://{s3_server.bucket}/lake"
    embedded = embed(f"{drawn_shards_on_s3}/drawn-{{000000..000001}}.tar", lake, TINY_ENCODER, views=2,
                     batch_size=64)
    latest = train(TrainSettings(lake, "mfavb", clusters=CLUSTERS, epochs=2, batch_size=64, run="s3-run",
                                 self_label_epochs=1))
    inferred = infer(lake, batch_size=512)
    return {"lake": lake, "embedded": embedded, "latest": latest, "inferred": inferred,
            "fs": s3_server.filesystem(), "root": f"{s3_server.bucket}/lake"}


def test_feature_table_on_s3_has_every_sample_as_plain_lists(s3_pipeline):
    fs, root = s3_pipeline["fs"], s3_pipeline["root"]
    assert s3_pipeline["embedded"].samples == 2 * SAMPLES and s3_pipeline["embedded"].bad_samples == 0
    files = fs.glob(f"{root}/features/shard=*/*.parquet")
    assert {f.split("/")[-2] for f in files} == {"shard=drawn-000000", "shard=drawn-000001"}
    for path in files:  # as written: no Ray tensor extension type, so Spark and DuckDB read it as is
        schema = pq.read_schema(path, filesystem=fs)
        assert schema.field("embedding").type == pa.list_(pa.float32())
        assert schema.field("views").type == pa.list_(pa.list_(pa.float32()))
        assert not any(isinstance(f.type, pa.ExtensionType) for f in schema)
        assert not any(b"ARROW:extension" in key for f in schema for key in (f.metadata or {}))
    features = pads.dataset(f"{root}/features", filesystem=fs, partitioning="hive").to_table(
        columns=["key", "embedding", "views"])
    assert features.num_rows == 2 * SAMPLES
    assert len(set(features.column("key").to_pylist())) == 2 * SAMPLES
    assert len(features.column("embedding")[0]) == 64 and len(features.column("views")[0]) == 2


def test_latest_points_at_the_trained_checkpoint(s3_pipeline):
    fs, root, latest = s3_pipeline["fs"], s3_pipeline["root"], s3_pipeline["latest"]
    with fs.open(f"{root}/models/LATEST") as f:
        assert json.load(f) == latest
    assert latest["model_version"] == "s3-run/epoch-3" and latest["clusters"] == CLUSTERS
    assert fs.exists(f"{root}/{latest['checkpoint']}/model.pt")


def test_labels_on_s3_one_per_key_read_with_duckdb(s3_pipeline):
    fs, root = s3_pipeline["fs"], s3_pipeline["root"]
    assert s3_pipeline["inferred"].rows == 2 * SAMPLES
    # DuckDB's httpfs extension cannot be downloaded offline, so DuckDB reads s3:// through the
    # same fsspec (s3fs) filesystem the lake uses, registered with DuckDB.
    con = duckdb.connect()
    con.register_filesystem(fs)
    rows, keys, low, high, min_conf, max_conf, versions, shards = con.execute(f"""
        SELECT count(*), count(DISTINCT key), min(cluster), max(cluster), min(confidence),
               max(confidence), list(DISTINCT model_version), count(DISTINCT shard)
        FROM read_parquet('s3://{root}/labels/*/*.parquet', hive_partitioning = true)
    """).fetchone()
    assert rows == keys == 2 * SAMPLES
    assert 0 <= low <= high < CLUSTERS
    assert 0 < min_conf <= max_conf <= 1.0
    assert versions == [s3_pipeline["latest"]["model_version"]]
    assert shards == 2
    unlabelled = con.execute(f"""
        SELECT count(*) FROM read_parquet('s3://{root}/features/*/*.parquet') f
        ANTI JOIN read_parquet('s3://{root}/labels/*/*.parquet') l USING (key)
    """).fetchone()[0]
    assert unlabelled == 0
