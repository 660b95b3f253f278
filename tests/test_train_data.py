"""A training worker's batches: the whole table every epoch, a new seeded order each epoch,
the same number of batches on every worker."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rayclust import train_data
from rayclust.lake import FEATURES
from rayclust.neighbours import table_rows
from rayclust.train_data import buffer_runs, cut_batches, feature_batches, plan_epoch

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


def test_batches_are_cut_across_runs_with_what_a_run_leaves_short_starting_the_next():
    runs = [(np.arange(n)[:, None] + start, np.arange(n) + start) for start, n in ((0, 70), (70, 10), (80, 45))]
    batches = list(cut_batches(iter(runs), 32))
    assert [len(rows) for _, rows in batches] == [32, 32, 32]  # 125 rows: 3 full batches, 29 left over
    assert np.concatenate([rows for _, rows in batches]).tolist() == list(range(96))
    assert all((views[:, 0] == rows).all() for views, rows in batches)


def test_files_are_grouped_into_runs_of_at_least_the_buffer(monkeypatch):
    monkeypatch.setattr(train_data, "BUFFER_ROWS", 500)
    runs = buffer_runs(np.array([5, 0, 3, 1, 4, 2]), ROWS)
    assert [run.tolist() for run in runs] == [[5, 0, 3], [1, 4], [2]]  # 510, 580, then the 400 left


def test_a_table_larger_than_the_buffer_streams_every_row_once_an_epoch(table, monkeypatch):
    monkeypatch.setattr(train_data, "BUFFER_ROWS", 500)  # 1,800 rows: several runs, each carrying into the next
    seen = rows_seen(table, 0, 0, 1)
    assert len(set(seen)) == len(seen) >= 1800 - 32
