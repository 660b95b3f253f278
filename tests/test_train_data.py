"""A training worker's batches: the whole table every epoch, a new seeded order each epoch,
the same number of batches on every worker."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rayclust.lake import FEATURES
from rayclust.neighbours import table_rows
from rayclust.train_data import feature_batches, plan_epoch

from test_neighbours import DIM, write_random_lake

ROWS = (300, 250, 400, 120, 330, 90)


def test_each_epoch_splits_a_new_file_order_among_the_workers():
    plans = [plan_epoch(ROWS, 64, seed=7, epoch=0, rank=rank, world=2) for rank in range(2)]
    assert sorted(np.concatenate([p.files for p in plans]).tolist()) == list(range(len(ROWS)))
    assert plans[0].batches == plans[1].batches == min(sum(ROWS[i] for i in p.files) for p in plans) // 64
    assert plan_epoch(ROWS, 64, 7, 0, 0, 2).files.tolist() == plans[0].files.tolist()  # a seed repeats
    orders = {tuple(np.concatenate([plan_epoch(ROWS, 64, 7, e, r, 2).files for r in range(2)])) for e in range(6)}
    assert len(orders) > 1


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    lake, clean = write_random_lake(tmp_path_factory.mktemp("lake") / "lake", shards=6, rows=300)
    index = {row.tobytes(): (shard, i) for shard, rows in clean.items() for i, row in enumerate(rows)}
    return lake, table_rows(lake, lake.newest_files(FEATURES), DIM), index


def rows_seen(table, epoch: int, rank: int, world: int, seed: int = 0) -> list[tuple[str, int]]:
    lake, layout, index = table
    batches = list(feature_batches(lake.uri, layout, None, 32, seed, epoch, rank, world, torch.device("cpu")))
    assert all(b["views"].shape == (32, 2, DIM) for b in batches)
    return [index[row.numpy().tobytes()] for b in batches for row in b["views"][:, 0]]


def test_two_workers_see_disjoint_rows_and_almost_the_whole_table(table):
    first, second = rows_seen(table, 0, 0, 2), rows_seen(table, 0, 1, 2)
    assert len(first) == len(second)  # DDP: the same number of steps on every worker
    assert len(set(first)) == len(first) and not set(first) & set(second)
    assert len(first) + len(second) >= 1800 - 2 * 32  # all but what cannot fill a last batch


def test_epochs_mix_rows_across_files_in_a_new_order_that_a_seed_repeats(table):
    epoch0, epoch1 = rows_seen(table, 0, 0, 1), rows_seen(table, 1, 0, 1)
    assert epoch0 != epoch1 and len(set(epoch0) & set(epoch1)) >= 1800 - 2 * 32  # the same rows, reordered
    assert rows_seen(table, 1, 0, 1) == epoch1
    first_batch_shards = {shard for shard, _ in epoch0[:32]}
    assert len(first_batch_shards) > 1  # rows from several files in one batch, not file by file
