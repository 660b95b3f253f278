"""What a training worker iterates for a feature model: the whole table, in a new order every epoch.

Every worker draws the same seeded permutation of the feature files for an epoch (seed, epoch),
takes every world-th file from its rank on, reads a few files ahead in threads and mixes the
rows of BUFFER_ROWS or more before cutting batches. All workers stop after the same number of
batches (the fewest any of them can fill), as DDP requires. A seed repeats a run; each epoch's
order is new; the table streams from the lake every epoch, so it may be larger than memory.
"""
from __future__ import annotations

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
    made = 0
    carried: tuple[np.ndarray, np.ndarray] | None = None
    for views, rows in mixed_rows(lake_uri, table, plan.files, rng):
        if carried is not None:
            views, rows = np.concatenate([carried[0], views]), np.concatenate([carried[1], rows])
        full = len(rows) - len(rows) % batch_size
        for start in range(0, full, batch_size):
            if made == plan.batches:
                return
            batch = {"views": torch.from_numpy(views[start:start + batch_size])}
            if neighbours is not None:
                batch["neighbour"] = torch.from_numpy(neighbours.pick(rows[start:start + batch_size], rng))
            yield {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
            made += 1
        carried = views[full:], rows[full:]


def mixed_rows(lake_uri: str, table: TableRows, files: np.ndarray,
               rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(views, row numbers) of the files, in shuffled runs of BUFFER_ROWS rows or more
    (``feature_batches`` carries what a run leaves short of a batch into the next)."""
    fs = Lake.open(lake_uri).arrow_fs
    offsets = table.offsets

    def read(index: int) -> tuple[np.ndarray, np.ndarray]:
        part = pq.read_table(table.paths[index], columns=["embedding", "views"], filesystem=fs)
        clean = list_to_numpy(part.column("embedding"), table.dim)
        views = list_to_numpy(part.column("views"), len(part.column("views")[0]), table.dim)
        return np.concatenate([clean[:, None], views], axis=1), offsets[index] + np.arange(part.num_rows)

    held: list[tuple[np.ndarray, np.ndarray]] = []
    with ThreadPoolExecutor(READ_AHEAD) as pool:
        for part in read_ahead(pool, read, files):
            held.append(part)
            if sum(len(rows) for _, rows in held) >= BUFFER_ROWS:
                yield shuffled(held, rng)
                held = []
        if held:
            yield shuffled(held, rng)


def read_ahead(pool: ThreadPoolExecutor, read, files: np.ndarray) -> Iterator:
    pending = [pool.submit(read, int(i)) for i in files[:READ_AHEAD]]
    for i in files[READ_AHEAD:]:
        yield pending.pop(0).result()
        pending.append(pool.submit(read, int(i)))
    for future in pending:
        yield future.result()


def shuffled(parts: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(sum(len(rows) for _, rows in parts))
    return np.concatenate([v for v, _ in parts])[order], np.concatenate([r for _, r in parts])[order]
