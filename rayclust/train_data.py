"""What a training worker iterates for a feature model: the whole table, in a new order every epoch.

Every worker draws the same seeded permutation of the feature files for an epoch (seed, epoch),
takes every world-th file from its rank on, reads a few files ahead in threads and mixes the
rows of BUFFER_ROWS or more before cutting batches. All workers stop after the same number of
batches (the fewest any of them can fill), as DDP requires. A seed repeats a run; each epoch's
order is new; the table streams from the lake every epoch, so it may be larger than memory.
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow.parquet as pq

from rayclust.lake import Lake, list_to_numpy
from rayclust.neighbours import Neighbours, TableRows

if TYPE_CHECKING:  # the driver reads the dealing rule (least_rows_per_worker) and must not import torch
    import torch

BUFFER_ROWS = 10_000  # rows mixed before batches are cut: CC-MLP lost 0.14 ACC with a few batches' worth
READ_AHEAD = 4  # files read ahead, in threads (pyarrow releases the GIL)


@dataclass(frozen=True)
class EpochPlan:
    files: np.ndarray  # this worker's file indices, in reading order
    batches: int  # what every worker makes this epoch


def least_rows_per_worker(rows: tuple[int, ...], world: int) -> int:
    """The fewest rows any epoch's deal (``plan_epoch``: whole files, in turn) can give a worker:
    its smallest share of files (0 when there are fewer files than workers)."""
    return int(sum(sorted(rows)[:len(rows) // world]))


def plan_epoch(rows: tuple[int, ...], batch_size: int, seed: int, epoch: int, rank: int, world: int) -> EpochPlan:
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    shares = [order[r::world] for r in range(world)]
    batches = min(sum(rows[i] for i in share) for share in shares) // batch_size
    return EpochPlan(shares[rank], batches)


def feature_batches(lake_uri: str, table: TableRows, neighbours: Neighbours | None, batch_size: int, seed: int,
                    epoch: int, rank: int, world: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch's batches on one worker: ``views`` [B, 1+V, D] (clean first) and, with
    neighbours, ``neighbour`` [B, D] (one of each row's nearest rows, drawn at random)."""
    import torch

    plan = plan_epoch(table.rows, batch_size, seed, epoch, rank, world)
    rng = np.random.default_rng([seed, epoch, rank])
    cut = cut_batches(mixed_rows(lake_uri, table, plan.files, rng), batch_size)
    for _, (views, rows) in zip(range(plan.batches), cut):
        batch = {"views": torch.from_numpy(views.copy())}  # not a view of the run: it goes with its last batch
        if neighbours is not None:
            batch["neighbour"] = torch.from_numpy(neighbours.pick(rows, rng))
        yield {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def cut_batches(runs: Iterator[tuple[np.ndarray, np.ndarray]], batch_size: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(views, row numbers) of ``batch_size`` rows, cut from the runs in turn; a run's rows short of
    a batch begin the next run's first batch (one batch copied, not the run)."""
    short: tuple[np.ndarray, np.ndarray] | None = None
    for views, rows in runs:
        start = 0
        if short is not None:
            start = min(batch_size - len(short[1]), len(rows))
            short = np.concatenate([short[0], views[:start]]), np.concatenate([short[1], rows[:start]])
            if len(short[1]) < batch_size:
                continue
            yield short
        end = start + (len(rows) - start) // batch_size * batch_size
        for first in range(start, end, batch_size):
            yield views[first:first + batch_size], rows[first:first + batch_size]
        short = (views[end:].copy(), rows[end:].copy()) if end < len(rows) else None
        del views, rows  # before the next run is read into a buffer of its own


def mixed_rows(lake_uri: str, table: TableRows, files: np.ndarray,
               rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(views, row numbers) of the files, in runs of BUFFER_ROWS rows or more, each in a new order.
    Each file's rows go to random places of its run's buffer as the file arrives, so a worker
    holds one run and the files it reads ahead, not copies of them."""
    fs = Lake.open(lake_uri).arrow_fs
    offsets = table.offsets

    def read(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        part = pq.read_table(table.paths[index], columns=["embedding", "views"], filesystem=fs)
        clean = list_to_numpy(part.column("embedding"), table.dim, copy=False)  # copied once, into the run
        views = list_to_numpy(part.column("views"), len(part.column("views")[0]), table.dim, copy=False)
        return clean, views, offsets[index] + np.arange(part.num_rows)

    with ThreadPoolExecutor(READ_AHEAD) as pool:
        parts = read_ahead(pool, read, files)
        for run in buffer_runs(files, table.rows):
            yield scattered(itertools.islice(parts, len(run)), sum(table.rows[i] for i in run), rng)


def buffer_runs(files: np.ndarray, rows: tuple[int, ...]) -> list[np.ndarray]:
    """The files in consecutive groups of BUFFER_ROWS rows or more (the last may hold fewer)."""
    runs, first, held = [], 0, 0
    for position, index in enumerate(files):
        held += rows[index]
        if held >= BUFFER_ROWS:
            runs.append(files[first:position + 1])
            first, held = position + 1, 0
    return runs + [files[first:]] if first < len(files) else runs


def read_ahead(pool: ThreadPoolExecutor, read, files: np.ndarray) -> Iterator:
    pending = [pool.submit(read, int(i)) for i in files[:READ_AHEAD]]
    for i in files[READ_AHEAD:]:
        yield pending.pop(0).result()
        pending.append(pool.submit(read, int(i)))
    for future in pending:
        yield future.result()


def scattered(parts: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One buffer of the parts' ``size`` rows, clean view first, each row at a random place."""
    places, filled = rng.permutation(size), 0
    views, rows = None, np.empty(size, np.int64)
    for clean, augmented, numbers in parts:
        if views is None:
            views = np.empty((size, 1 + augmented.shape[1], clean.shape[1]), clean.dtype)
        where = places[filled:filled + len(numbers)]
        views[where, 0], views[where, 1:], rows[where] = clean, augmented, numbers
        filled += len(numbers)
    return views, rows
