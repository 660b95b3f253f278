"""rayclust.duplicates: the in-cluster search on arrays (the pass over a lake: tests/test_lake.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from rayclust.clusters import unit_rows
from rayclust.duplicates import duplicates_in_cluster, more_typical_duplicates


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
