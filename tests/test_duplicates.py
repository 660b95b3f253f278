"""rayclust.duplicates: the in-cluster search on arrays, large clusters cut into buckets, and the
pass over a lake with a cut cluster (the pass on S3 after a real infer: tests/test_lake.py), and the
clusters' duplicate counts over label files written before and after ``duplicate_of`` existed."""
from __future__ import annotations

import datetime

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_digits_feature_lake
from rayclust.clusters import label_counts, unit_rows
from rayclust.duplicates import (DUPLICATE_OF, Buckets, cluster_buckets, duplicates_in_cluster, find_duplicates,
                                 more_typical_duplicates)
from rayclust.lake import FEATURES, LABELS
from rayclust.lock import LakeLock


def brute_force(unit: np.ndarray, epsilon: float) -> np.ndarray:
    similar = unit @ unit.T >= 1 - epsilon
    return np.array([next((j for j in range(i) if similar[i, j]), -1) for i in range(len(unit))])


def test_each_row_points_at_the_most_typical_earlier_row_that_is_close_enough():
    rng = np.random.default_rng(0)
    base = unit_rows(rng.normal(size=(40, 16))).astype(np.float32)
    # copies, near copies and a chain: row 40 is row 3 again, 41 and 42 are row 5 nudged
    near = base[[5, 5]] + rng.normal(scale=0.05, size=(2, 16)).astype(np.float32)
    unit = unit_rows(np.concatenate([base, base[[3]], near])).astype(np.float32)
    found = more_typical_duplicates(unit, 0.05)
    assert (found == brute_force(unit, 0.05)).all()
    assert found[40] == 3 and found[41] == 5 and found[42] == 5 and (found[:40] == -1).all()
    assert (more_typical_duplicates(unit, 0.0) == -1).all()  # epsilon 0: off


def test_a_cluster_becomes_its_pairs_in_order_of_distance_then_key():
    embedding = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.01]]
    group = pa.table({"key": ["b", "a", "c", "d"], "shard": ["s1", "s0", "s0", "s1"], "cluster": [2] * 4,
                      "distance": pa.array([0.1, 0.1, 0.2, None], pa.float32()),
                      "embedding": pa.array(embedding, pa.list_(pa.float32()))})
    pairs = duplicates_in_cluster(group, 0.05)
    assert sorted(zip(*(pairs.column(c).to_pylist() for c in ("key", "shard", "duplicate_of")))) == [
        ("b", "s1", "a"), ("d", "s1", "a")]  # a ties b on distance and wins by key; d has no distance


def test_only_clusters_over_the_limit_are_cut_one_bucket_per_limit():
    rng = np.random.default_rng(0)
    sample = unit_rows(rng.normal(size=(300, 8))).astype(np.float32)
    assigned = np.repeat([0, 1, 2], 100)
    buckets = cluster_buckets(np.array([250, 90, 1001]), sample, assigned, limit=100)
    assert sorted(buckets.centres) == [0, 2] and len(buckets.centres[0]) == 3 and len(buckets.centres[2]) == 11
    assert buckets.groups == 2 + 10
    rows = np.concatenate([sample, sample[:5]])  # the last five repeat the first five
    found = buckets.of(np.concatenate([assigned, assigned[:5]]), rows)
    assert (found[100:200] == 0).all() and set(found[:100]) == {0, 1, 2} and (found[300:] == found[:5]).all()
    nearest = np.argmax(sample[:100] @ buckets.centres[0].T, axis=1)
    assert (found[:100] == nearest).all()
    assert Buckets().groups == 0 and (Buckets().of(assigned, sample) == 0).all()


def digits_label_files(lake, data, clusters: np.ndarray) -> dict[str, str]:
    """A label file per shard of the digits feature lake, as infer writes them, with the given clusters."""
    files = {}
    for shard, path in lake.newest_files(FEATURES).items():
        keys = pq.read_table(path, columns=["key"], filesystem=lake.arrow_fs).column("key").to_pylist()
        rows = np.searchsorted(data["keys"], keys)
        centre = unit_rows(unit_rows(data["clean"]).mean(0, keepdims=True))[0]
        distance = 1 - unit_rows(data["clean"][rows]) @ centre
        table = pa.table({"key": keys, "source": pa.nulls(len(keys), pa.string()),
                          "cluster": pa.array(clusters[rows], pa.int32()),
                          "confidence": pa.array(np.ones(len(keys)), pa.float32()),
                          "distance": pa.array(distance, pa.float32()), "model_version": ["digits/epoch-1"] * len(keys),
                          "labeled_at": pa.array([datetime.datetime(2026, 11, 30)] * len(keys), pa.timestamp("us")),
                          DUPLICATE_OF: pa.nulls(len(keys), pa.string())})
        files[shard] = lake.path(LABELS, f"shard={shard}", "w0_f0.parquet")
        lake.fs.makedirs(files[shard].rsplit("/", 1)[0], exist_ok=True)
        pq.write_table(table, files[shard], filesystem=lake.arrow_fs)
    return files


@pytest.mark.slow  # a Ray of its own, and the pass's three Ray Data stages
def test_a_cut_cluster_finds_the_pairs_each_bucket_holds(ray_session, digits_features, tmp_path):
    """The digits as one cluster of 1,797 rows, cut into 4 buckets of at most 500: every row is
    grouped with its bucket, and within each the pass finds what numpy finds; the exact copies (the
    last 97 rows repeat the first 97 under new keys) are all marked."""
    data = dict(digits_features)
    copies = 97
    data["keys"] = np.concatenate([data["keys"][:-copies], [f"digit-copy-{i:05d}" for i in range(copies)]])
    for name in ("clean", "views", "labels"):
        data[name] = np.concatenate([data[name][:-copies], data[name][:copies]])
    order = np.argsort(data["keys"])
    data = {name: values[order] for name, values in data.items()}
    lake = write_digits_feature_lake(data, str(tmp_path / "lake"), shards=2)
    clusters = np.zeros(len(data["keys"]), np.int64)
    label_files = digits_label_files(lake, data, clusters)
    unit = unit_rows(data["clean"]).astype(np.float32)
    buckets = cluster_buckets(np.array([len(unit)]), unit, clusters, limit=500)
    assert len(buckets.centres[0]) == 4
    columns = tuple(pq.read_schema(next(iter(label_files.values())), filesystem=lake.arrow_fs).names)
    with LakeLock(lake, "test") as lock:
        done = find_duplicates(lake, lock, label_files, lake.newest_files(FEATURES), 0.05, columns, 1, buckets)
    assert not done.failures and done.rewritten == 2
    assert set(done.label_files.values()).isdisjoint(label_files.values())  # both shards republished
    rows = duckdb.execute(f"SELECT key, distance, duplicate_of FROM read_parquet({sorted(done.label_files.values())})"
                          ).fetchall()
    found = {key: of for key, _, of in rows if of is not None}
    index = {key: i for i, key in enumerate(data["keys"])}
    bucket = buckets.of(clusters, unit)
    expected = {}
    for b in range(4):
        members = sorted((r for r in rows if bucket[index[r[0]]] == b), key=lambda r: (r[1], r[0]))
        found_here = more_typical_duplicates(unit[[index[r[0]] for r in members]], 0.05)
        expected.update({members[i][0]: members[j][0] for i, j in enumerate(found_here) if j >= 0})
    assert len(rows) == len(data["keys"]) and found == expected
    assert all(f"digit-copy-{i:05d}" in found or f"digit-{i:05d}" in found for i in range(copies))


@pytest.mark.slow
def test_cluster_counts_read_label_files_from_before_duplicates_were_marked(ray_session, digits_features, tmp_path):
    """A lake labelled before ``duplicate_of`` existed keeps those files until a shard is relabelled:
    the clusters' counts read them as marking no duplicate, beside newer files that do."""
    lake = write_digits_feature_lake(digits_features, str(tmp_path / "lake"), shards=2)
    clusters = digits_features["labels"]
    older, newer = digits_label_files(lake, digits_features, clusters).values()
    pq.write_table(pq.read_table(older, filesystem=lake.arrow_fs).drop_columns([DUPLICATE_OF]), older,
                   filesystem=lake.arrow_fs)
    table = pq.read_table(newer, filesystem=lake.arrow_fs)
    marked = np.arange(table.num_rows) % 3 == 0
    marks = pa.array(np.where(marked, "digit-00000", None), pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index(DUPLICATE_OF), DUPLICATE_OF, marks), newer,
                   filesystem=lake.arrow_fs)
    newer_clusters = pq.read_table(newer, columns=["cluster"], filesystem=lake.arrow_fs).column("cluster").to_numpy()
    for files in ([older, newer], [newer, older]):  # either first: the first file read sets what Ray Data expects
        counts = label_counts(lake, files, 10)
        assert counts.sizes.tolist() == np.bincount(clusters, minlength=10).tolist()
        assert counts.duplicates.tolist() == np.bincount(newer_clusters[marked], minlength=10).tolist()
        assert counts.duplicates.sum() > 0 and np.allclose(counts.confidence, 1.0)
