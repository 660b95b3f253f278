"""Label-free cluster health (rayclust.health): sizes, empty clusters, mean confidence and the
collapse warning, from arrays and from real label files; and the k-means baseline that train and
infer share (rayclust.evaluation.kmeans_baseline), kept in the lake per feature table version."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayclust.evaluation import kmeans_baseline
from rayclust.health import ClusterHealth, health_of, label_health
from rayclust.lake import EVALUATION, FEATURES, Lake

from conftest import write_digits_feature_lake


def test_sizes_median_and_confidence_of_arrays():
    health = health_of(np.array([0, 0, 0, 1, 2, 2]), np.array([0.5, 1.0, 0.9, 0.6, 0.7, 0.9]), 4, "a test")
    assert health.sizes == (3, 1, 2, 0)
    assert (health.rows, health.empty) == (6, 1)
    assert health.mean_confidence == pytest.approx(0.7667, abs=1e-4)
    text = str(health)
    assert "sizes smallest 0, median 1, largest 3; 1 empty; mean confidence 0.767" in text, text
    assert "a test (6 rows, 4 clusters)" in text, text


@pytest.mark.parametrize("sizes, warned, phrase", [
    ((10, 10, 10, 10), False, None),
    ((10, 0, 10, 0, 10, 10, 10, 10, 10, 10), True, "2 of 10 clusters are empty"),
    ((70, 10, 10, 10), True, "cluster 0 holds 70% of the rows"),
    ((60, 20, 20), False, None),  # K = 3: it takes more than twice the fair third (2/3) to warn
    ((70, 20, 10), True, "cluster 0 holds 70% of the rows"),
    ((30, 70), False, None),  # K = 2: one cluster always holds half or more
    ((0, 100), True, "1 of 2 clusters are empty"),
])
def test_collapse_warning(sizes, warned, phrase):
    health = ClusterHealth(sizes, 0.9, "a test")
    assert (health.warning is not None) == warned, health
    if warned:
        assert health.warning.startswith("warning: the clusters collapsed: ") and phrase in health.warning
        assert str(health).splitlines()[-1] == health.warning
    else:
        assert "warning" not in str(health)


def test_label_health_reads_every_label_file(tmp_path):
    lake = Lake.open(str(tmp_path / "lake"), create=True)
    files = {}
    for shard, clusters in {"a": [0, 0, 1], "b": [1, 1, 1, 0], "c": []}.items():
        path = tmp_path / "lake" / "labels" / f"shard={shard}" / "w.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"key": [f"{shard}{i}" for i in range(len(clusters))],
                                 "cluster": pa.array(clusters, pa.int32()),
                                 "confidence": pa.array([0.5] * len(clusters), pa.float32())}), path)
        files[shard] = str(path)
    health = label_health(lake, files, 3)
    assert health.sizes == (3, 4, 0) and health.mean_confidence == pytest.approx(0.5)
    assert "1 of 3 clusters are empty" in health.warning
    assert label_health(lake, {}, 2).sizes == (0, 0)


def test_kmeans_baseline_is_computed_once_per_table_version(tmp_path, digits_features):
    lake = write_digits_feature_lake(digits_features, str(tmp_path / "lake"), shards=2)
    files = lake.newest_files(FEATURES)
    first = kmeans_baseline(lake, files, 10)
    assert 0.3 < first["acc"] <= 1.0  # chance is 0.1
    [saved] = lake.fs.ls(lake.path(EVALUATION))
    marked = {**lake.read_json(EVALUATION, saved.rsplit("/", 1)[-1]), "metrics": {"acc": -1.0, "nmi": 0, "ari": 0}}
    lake.write_json(marked, EVALUATION, saved.rsplit("/", 1)[-1])
    assert kmeans_baseline(lake, files, 10)["acc"] == -1.0, "the second job reads the first one's k-means"
    assert kmeans_baseline(lake, files, 5)["acc"] > 0, "another K is another baseline"

    write_digits_feature_lake(digits_features, lake.uri, shards=1)  # embed writes shard 0 again: a new table version
    assert lake.newest_files(FEATURES) != files
    assert kmeans_baseline(lake, lake.newest_files(FEATURES), 10) == first
    assert len(lake.fs.ls(lake.path(EVALUATION))) == 3
