"""The lake (rayclust.lake) on a real S3 API (SeaweedFS ``weed mini``): the tables embed -> train ->
infer -> report write there, as pyarrow and DuckDB read them, and the report as Chromium shows it.

The flow runs once (module fixture) on two drawn JPEG shards uploaded to ``s3://BUCKET/drawn/`` and
a copy of the first under other keys (``s3://BUCKET/copies/copy-000000.tar``: exact duplicates);
the tests then check what landed in ``s3://BUCKET/lake``. The same on a local lake:
tests/test_features.py.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY_ENCODER

SAMPLES = 100  # per drawn shard
CLUSTERS = 10
SHARDS = ("copy-000000", "drawn-000000", "drawn-000001")
ROWS = len(SHARDS) * SAMPLES
EPSILON = 0.05  # infer's default


def copy_with_other_keys(source, fs, target: str) -> None:
    """The shard's images again, byte for byte, under keys ``copy…`` instead of ``drawn…``."""
    copied = io.BytesIO()
    with tarfile.open(source) as original, tarfile.open(fileobj=copied, mode="w") as tar:
        for member in original.getmembers():
            data = original.extractfile(member).read()
            member.name = member.name.replace("drawn", "copy", 1)
            tar.addfile(member, io.BytesIO(data))
    fs.pipe(target, copied.getvalue())


@pytest.fixture(scope="module")
def s3_pipeline(s3_server, drawn_shards, drawn_shards_on_s3, ray_session) -> dict:
    from rayclust.features import embed
    from rayclust.labels import infer
    from rayclust.report import write_report
    from rayclust.training import TrainSettings, train

    lake, bucket = f"s3://{s3_server.bucket}/lake", f"s3://{s3_server.bucket}"
    copy_with_other_keys(drawn_shards / "drawn-000000.tar", s3_server.filesystem(),
                         f"{s3_server.bucket}/copies/copy-000000.tar")
    embedded = embed(f"{bucket}/{{drawn/drawn-000000,drawn/drawn-000001,copies/copy-000000}}.tar", lake,
                     TINY_ENCODER, views=2, batch_size=64)
    latest = train(TrainSettings(lake, "mfavb", clusters=CLUSTERS, epochs=2, batch_size=64, run="s3-run",
                                 self_label_epochs=1))
    inferred = infer(lake, batch_size=512)
    report = write_report(lake)
    return {"lake": lake, "embedded": embedded, "latest": latest, "inferred": inferred, "report": report,
            "fs": s3_server.filesystem(), "root": f"{s3_server.bucket}/lake"}


@pytest.fixture(scope="module")
def duck(s3_pipeline) -> duckdb.DuckDBPyConnection:
    """DuckDB reading s3:// through the lake's own fsspec (s3fs) filesystem: its httpfs extension
    cannot be downloaded offline."""
    con = duckdb.connect()
    con.register_filesystem(s3_pipeline["fs"])
    return con


def test_feature_table_on_s3_has_every_sample_as_plain_lists(s3_pipeline):
    fs, root = s3_pipeline["fs"], s3_pipeline["root"]
    assert s3_pipeline["embedded"].samples == ROWS and s3_pipeline["embedded"].bad_samples == 0
    files = fs.glob(f"{root}/features/shard=*/*.parquet")
    assert {f.split("/")[-2] for f in files} == {f"shard={s}" for s in SHARDS}
    for path in files:  # as written: no Ray tensor extension type, so Spark and DuckDB read it as is
        schema = pq.read_schema(path, filesystem=fs)
        assert schema.field("embedding").type == pa.list_(pa.float32())
        assert schema.field("views").type == pa.list_(pa.list_(pa.float32()))
        assert not any(isinstance(f.type, pa.ExtensionType) for f in schema)
        assert not any(b"ARROW:extension" in key for f in schema for key in (f.metadata or {}))
    features = pads.dataset(f"{root}/features", filesystem=fs, partitioning="hive").to_table(
        columns=["key", "embedding", "views"])
    assert features.num_rows == ROWS
    assert len(set(features.column("key").to_pylist())) == ROWS
    assert len(features.column("embedding")[0]) == 64 and len(features.column("views")[0]) == 2


def test_latest_points_at_the_trained_checkpoint(s3_pipeline):
    fs, root, latest = s3_pipeline["fs"], s3_pipeline["root"], s3_pipeline["latest"]
    with fs.open(f"{root}/models/LATEST") as f:
        assert json.load(f) == latest
    assert latest["model_version"] == "s3-run/epoch-3" and latest["clusters"] == CLUSTERS
    assert fs.exists(f"{root}/{latest['checkpoint']}/model.pt")


def test_labels_on_s3_one_per_key_read_with_duckdb(s3_pipeline, duck):
    root, con = s3_pipeline["root"], duck
    assert s3_pipeline["inferred"].rows == ROWS
    rows, keys, low, high, min_conf, max_conf, versions, shards = con.execute(f"""
        SELECT count(*), count(DISTINCT key), min(cluster), max(cluster), min(confidence),
               max(confidence), list(DISTINCT model_version), count(DISTINCT shard)
        FROM read_parquet('s3://{root}/labels/*/*.parquet', hive_partitioning = true)
    """).fetchone()
    assert rows == keys == ROWS
    assert 0 <= low <= high < CLUSTERS
    assert 0 < min_conf <= max_conf <= 1.0
    assert versions == [s3_pipeline["latest"]["model_version"]]
    assert shards == len(SHARDS)
    unlabelled = con.execute(f"""
        SELECT count(*) FROM read_parquet('s3://{root}/features/*/*.parquet') f
        ANTI JOIN read_parquet('s3://{root}/labels/*/*.parquet') l USING (key)
    """).fetchone()[0]
    assert unlabelled == 0


def test_clusters_table_names_sizes_and_centres_read_with_duckdb(s3_pipeline, duck):
    from rayclust.naming import TOP_NAMES, imagenet_classnames

    root, version = s3_pipeline["root"], s3_pipeline["latest"]["model_version"]
    rows = duck.execute(f"""
        SELECT cluster, model_version, size, mean_confidence, name, top_names, centre
        FROM read_parquet('s3://{root}/clusters/*/*.parquet') ORDER BY cluster""").fetchall()
    assert [r[0] for r in rows] == list(range(CLUSTERS)) and {r[1] for r in rows} == {version}
    labels = dict(duck.execute(f"SELECT cluster, count(*) FROM read_parquet('s3://{root}/labels/*/*.parquet') "
                               "GROUP BY cluster").fetchall())
    assert {r[0]: r[2] for r in rows if r[2]} == labels and sum(r[2] for r in rows) == ROWS
    words = set(imagenet_classnames())  # the tiny open_clip encoder's text tower names from ImageNet's classes
    named = [r[4] for r in rows if r[2]]
    assert len(set(named)) == len(named), named  # one word per cluster
    for cluster, _, size, confidence, name, top_names, centre in rows:
        if size == 0:
            assert confidence is None
            continue
        assert 0 < confidence <= 1 and name in words and top_names[0]["name"] in words
        assert len(top_names) == TOP_NAMES and top_names[0]["score"] >= top_names[-1]["score"]
        assert len(centre) == 64 and abs(np.linalg.norm(centre) - 1) < 1e-4


def test_label_distance_is_the_cosine_distance_to_the_cluster_centre(s3_pipeline, duck):
    root = s3_pipeline["root"]
    rows, nulls, worst_error, low, high = duck.execute(f"""
        SELECT count(*), count(*) FILTER (WHERE l.distance IS NULL),
               max(abs(l.distance - (1 - list_cosine_similarity(f.embedding, c.centre)))),
               min(l.distance), max(l.distance)
        FROM read_parquet('s3://{root}/labels/*/*.parquet') l
        JOIN read_parquet('s3://{root}/features/*/*.parquet') f USING (key)
        JOIN read_parquet('s3://{root}/clusters/*/*.parquet') c USING (cluster)""").fetchone()
    assert rows == ROWS and nulls == 0  # every cluster has members among the sampled rows
    assert worst_error < 1e-4 and 0 <= low < high <= 2


def expected_duplicates(rows: list[tuple]) -> dict[str, str]:
    """The numpy recomputation: in each cluster, from typical to odd (distance, then key), each row's
    first earlier row at cosine similarity >= 1 - EPSILON."""
    expected = {}
    for cluster in {r[1] for r in rows}:
        members = sorted((r for r in rows if r[1] == cluster), key=lambda r: (r[2], r[0]))
        unit = np.array([r[4] for r in members], np.float64)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        similar = unit @ unit.T >= 1 - EPSILON
        for i, row in enumerate(members):
            earlier = np.flatnonzero(similar[i, :i])
            if len(earlier):
                expected[row[0]] = members[earlier[0]][0]
    return expected


def test_labels_mark_near_duplicates_as_numpy_finds_them(s3_pipeline, duck):
    root = s3_pipeline["root"]
    rows = duck.execute(f"""
        SELECT key, l.cluster, l.distance, l.duplicate_of, f.embedding
        FROM read_parquet('s3://{root}/labels/*/*.parquet') l
        JOIN read_parquet('s3://{root}/features/*/*.parquet') f USING (key)""").fetchall()
    found = {r[0]: r[3] for r in rows if r[3] is not None}
    assert len(rows) == ROWS and found == expected_duplicates(rows)
    for sample in range(SAMPLES):  # every exact copy is marked: one of the pair points at the other or beyond
        assert f"drawn000000_{sample:05d}" in found or f"copy000000_{sample:05d}" in found, sample
    counts = dict(duck.execute(f"""
        SELECT cluster, duplicates FROM read_parquet('s3://{root}/clusters/*/*.parquet')""").fetchall())
    per_cluster = dict(duck.execute(f"""SELECT cluster, count(duplicate_of)
        FROM read_parquet('s3://{root}/labels/*/*.parquet') GROUP BY cluster""").fetchall())
    assert {k: v for k, v in counts.items() if v} == {k: v for k, v in per_cluster.items() if v}
    assert sum(counts.values()) == len(found) >= SAMPLES


def test_features_and_labels_carry_each_images_source(s3_pipeline, duck):
    root = s3_pipeline["root"]
    rows, matching = duck.execute(f"""
        SELECT count(*), count(*) FILTER (WHERE f.source = l.source
               AND f.source = 'synthetic/' || (f.shard[-1:]) || '/' || CAST(CAST(key[-5:] AS INT) AS VARCHAR))
        FROM read_parquet('s3://{root}/features/*/*.parquet', hive_partitioning = true) f
        JOIN read_parquet('s3://{root}/labels/*/*.parquet') l USING (key)""").fetchone()
    assert rows == matching == ROWS  # as write_synthetic_shards put it in each sample's .json


def test_features_carry_a_jpeg_thumbnail_of_each_image(s3_pipeline):
    fs, root = s3_pipeline["fs"], s3_pipeline["root"]
    table = pads.dataset(f"{root}/features", filesystem=fs, partitioning="hive").to_table(columns=["thumbnail"])
    thumbnails = table.column("thumbnail").to_pylist()
    assert len(thumbnails) == ROWS and all(thumbnails)
    sizes = {Image.open(io.BytesIO(t)).size for t in thumbnails}
    assert sizes == {(32, 32)}  # the drawn images are 32 px: a thumbnail never enlarges


def test_report_opens_in_chromium_with_every_cluster_named_and_its_images_loaded(s3_pipeline, tmp_path):
    from playwright.sync_api import sync_playwright

    fs, report = s3_pipeline["fs"], s3_pipeline["report"]
    assert report.path == f"{s3_pipeline['lake']}/reports/s3-run/epoch-3/index.html" and report.images == ROWS
    page_file = tmp_path / "index.html"
    fs.get(report.path, str(page_file))
    clusters = pq.read_table(f"{s3_pipeline['root']}/clusters/s3-run/epoch-3.parquet", filesystem=fs).to_pylist()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        failed, errors = [], []
        page.on("requestfailed", lambda request: failed.append(request.url))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(page_file.as_uri(), wait_until="load")
        sections = page.evaluate("""() => Array.from(document.querySelectorAll('section.cluster')).map(s => ({
            cluster: Number(s.dataset.cluster), title: s.querySelector('h3').innerText,
            images: Array.from(s.querySelectorAll('img')).map(i => i.complete && i.naturalWidth)}))""")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not failed and not errors, (failed, errors)
    assert sorted(s["cluster"] for s in sections) == list(range(CLUSTERS))
    for section in sections:
        row = clusters[section["cluster"]]
        assert section["title"].startswith(row["name"]), section
        # the report samples every shard of a three-shard lake: each non-empty cluster shows images
        assert (len(section["images"]) > 0) == (row["size"] > 0), section
        assert all(width == 32 for width in section["images"]), section  # every image decoded
    assert Image.open(tmp_path / "report.png").size[1] > 900  # the whole page, not a blank viewport
