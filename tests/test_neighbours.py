"""Nearest rows over the whole feature table: faiss search, kept in the lake, reused per table."""
from __future__ import annotations

import numpy as np
import pytest

from rayclust import neighbours as nb
from rayclust.features import write_feature_arrays
from rayclust.lake import FEATURES, NEIGHBOURS, Lake
from rayclust.neighbours import Neighbours, nearest_rows, neighbour_store, table_rows

DIM = 8


def test_exact_search_finds_the_closest_other_rows():
    features = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], np.float32)
    nearest, method = nearest_rows(features, 1)
    assert method.startswith("exact")
    assert nearest[:, 0].tolist() == [1, 0, 3, 2, 2]  # [-1, 0] is least unlike [0, 1]
    assert nearest_rows(features[:2], 3)[0].tolist() == [[1, 0, 0], [0, 1, 1]]  # fewer rows than k: itself


def test_ivf_search_beyond_the_exact_limit_finds_most_true_neighbours(monkeypatch):
    """The IVF index (for tables too large to compare every pair) against the exact answer."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    features = (centres[rng.integers(20, size=4000)] + 0.3 * rng.normal(size=(4000, 32))).astype(np.float32)
    exact, _ = nearest_rows(features, 5)
    monkeypatch.setattr(nb, "EXACT_MAX_ROWS", 1000)
    approximate, method = nearest_rows(features, 5)
    assert method.startswith("IVF")
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approximate, exact)])
    assert recall > 0.9, recall
    assert not (approximate == np.arange(4000)[:, None]).any()  # never itself while others exist


def write_random_lake(path, shards: int, rows: int, seed: int = 0) -> tuple[Lake, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lake = Lake.open(str(path), create=True)
    clean = {}
    for s in range(shards):
        clean[f"part-{s}"] = rng.normal(size=(rows, DIM)).astype(np.float32)
        write_feature_arrays(lake, f"part-{s}", np.array([f"{s}-{i}" for i in range(rows)]), None,
                             clean[f"part-{s}"], clean[f"part-{s}"][:, None] + 0.01, "random")
    return lake, clean


def test_neighbours_are_mined_once_per_table_and_looked_up_by_row(ray_session, tmp_path, capsys):
    lake, clean = write_random_lake(tmp_path / "lake", shards=3, rows=40)
    table = table_rows(lake, lake.newest_files(FEATURES), DIM)
    assert table.rows == (40, 40, 40) and table.total == 120
    store, mined = neighbour_store(lake, table, k=4, cpus=1)
    assert not mined.reused and mined.rows == 120
    assert lake.read_json(NEIGHBOURS, table.version, nb.META_FILE)["k"] == 4
    in_order = np.concatenate([clean[s] for s in sorted(clean)])  # rows are numbered shard by shard
    expected, _ = nearest_rows(in_order, 4)
    local = Neighbours(store)
    np.testing.assert_array_equal(local.nearest, expected)
    rows = np.arange(120)
    picked = local.pick(rows, np.random.default_rng(0))
    for row, embedding in zip(rows, picked):  # one of its neighbours' clean embeddings (float16 in the store)
        assert min(np.abs(in_order[expected[row]] - embedding).max(1)) < 1e-2

    again, reused = neighbour_store(lake, table, k=3, cpus=1)
    assert reused.reused
    np.testing.assert_array_equal(Neighbours(again).nearest, expected[:, :3])

    write_feature_arrays(lake, "part-1", np.array([f"x-{i}" for i in range(40)]), None, clean["part-0"],
                         clean["part-0"][:, None], "random")  # re-embedded: a new version of the table
    changed = table_rows(lake, lake.newest_files(FEATURES), DIM)
    assert changed.version != table.version
    assert not neighbour_store(lake, changed, k=4, cpus=1)[1].reused


@pytest.mark.parametrize("rows, k", [(1, 3), (2, 5)])
def test_tiny_tables_pad_with_the_row_itself(rows, k):
    features = np.random.default_rng(0).normal(size=(rows, DIM)).astype(np.float32)
    nearest, _ = nearest_rows(features, k)
    assert nearest.shape == (rows, k)
    assert all(set(row) <= set(range(rows)) for row in nearest.tolist())
