"""Each feature row's nearest rows in the whole table, mined once per table with faiss.

A feature model with ``neighbours`` in its config pairs a row with one of its k nearest rows
(cosine). They are mined once per version of the feature table (its files: a re-embedded shard
makes a new version) and kept in the lake as row numbers, ``neighbours/<version>/part-*.parquet``
(``row``, ``neighbours``), with ``meta.json`` written last; a later run on the same table reads
them. Rows are numbered in the table's order: shards sorted by name, rows in file order.

The clean embeddings go to the object store once, as float16 chunks of whole files, owned by
the driver; a training worker looks a neighbour's embedding up by its row number, so no vector
is sent twice (``Neighbours``).
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from rayclust.lake import NEIGHBOURS, Lake, list_to_numpy, table_version

EXACT_MAX_ROWS = 50_000  # up to here a flat index compares every pair; beyond, an IVF index
IVF_PROBES = 16
IVF_TRAIN_PER_LIST = 40  # faiss warns below 39
HNSW_LINKS = 32  # of the graph that finds a row's nearest lists (faiss's IVF<lists>_HNSW32)
SEARCH_BATCH = 16_384
CHUNK_BYTES = 256 << 20  # object-store chunks of clean embeddings
PART_ROWS = 1_000_000
READ_THREADS = 16
META_FILE = "meta.json"


@dataclass(frozen=True)
class TableRows:
    """The feature table's files in row order, with their row counts and embedding width."""

    paths: tuple[str, ...]
    rows: tuple[int, ...]
    dim: int
    version: str

    @property
    def offsets(self) -> np.ndarray:
        """The first row number of each file."""
        return np.concatenate([[0], np.cumsum(self.rows)[:-1]]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(sum(self.rows))


def table_rows(lake: Lake, files: dict[str, str], dim: int) -> TableRows:
    """The files (shard -> path) in shard order, their rows read from the Parquet footers."""
    shards = sorted(files)
    paths = tuple(files[s] for s in shards)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        rows = tuple(pool.map(lambda p: pq.ParquetFile(p, filesystem=lake.arrow_fs).metadata.num_rows, paths))
    return TableRows(paths, rows, dim, table_version(files))


@dataclass(frozen=True)
class NeighbourStore:
    """Object-store references to the clean embeddings (float16 chunks of whole files, the
    first row of each in ``starts``) and the nearest rows (int32 [N, k])."""

    starts: tuple[int, ...]
    chunks: tuple[ray.ObjectRef, ...]
    nearest: ray.ObjectRef
    k: int


@dataclass(frozen=True)
class MinedNeighbours:
    rows: int
    k: int
    method: str
    seconds: float
    reused: bool

    def __str__(self) -> str:
        verb = "read from the lake (mined earlier for this table)" if self.reused else "mined"
        return f"neighbours: {self.k} per row of {self.rows:,} rows {verb}: {self.method}, {self.seconds:.1f}s"


def neighbour_store(lake: Lake, table: TableRows, k: int, cpus: int) -> tuple[NeighbourStore, MinedNeighbours]:
    """Put the table's clean embeddings in the object store and mine (or read) each row's k
    nearest rows in a Ray task of ``cpus`` CPUs; returns once they are ready."""
    groups = chunk_files(table)
    offsets = table.offsets
    chunks = tuple(read_clean.remote(lake.uri, [table.paths[i] for i in group], table.dim) for group in groups)
    nearest, report = nearest_rows_task.options(num_cpus=cpus, num_returns=2).remote(
        lake.uri, table.version, table.total, k, cpus, *chunks)
    store = NeighbourStore(tuple(int(offsets[group[0]]) for group in groups), chunks, nearest, k)
    return store, ray.get(report)


def chunk_files(table: TableRows) -> list[list[int]]:
    """File indices grouped in order so that each group's float16 embeddings stay near CHUNK_BYTES."""
    per_chunk = max(1, CHUNK_BYTES // (2 * table.dim))
    groups: list[list[int]] = [[]]
    held = 0
    for index, rows in enumerate(table.rows):
        if groups[-1] and held + rows > per_chunk:
            groups.append([])
            held = 0
        groups[-1].append(index)
        held += rows
    return groups


# One call per worker, as below: the worker that had read a chunk stayed idle through the training
# run holding what its allocator kept of it (+100 MiB RSS over a bare worker for 10,000 rows).
@ray.remote(num_cpus=0.25, max_calls=1)
def read_clean(lake_uri: str, paths: list[str], dim: int) -> np.ndarray:
    """float16 clean embeddings [rows, D] of these files, in order."""
    fs = Lake.open(lake_uri).arrow_fs
    with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:
        parts = list(pool.map(lambda p: pq.read_table(p, columns=["embedding"], filesystem=fs), paths))
    return np.concatenate([list_to_numpy(part.column("embedding"), dim) for part in parts]).astype(np.float16)


# One call per worker: the search holds the float32 vectors and the index (4.2 GB at 1 M rows), and
# the worker that had run it stayed idle through the whole training run with 1.2 GB of it resident.
@ray.remote(max_retries=2, max_calls=1)
def nearest_rows_task(lake_uri: str, version: str, total: int, k: int, threads: int,
                      *chunks: np.ndarray) -> tuple[np.ndarray, MinedNeighbours]:
    started = time.time()
    lake = Lake.open(lake_uri)
    saved = read_saved(lake, version, total, k)
    if saved is not None:
        nearest, method = saved
        return nearest, MinedNeighbours(total, k, method, time.time() - started, reused=True)
    import faiss

    faiss.omp_set_num_threads(threads)
    nearest, method = nearest_rows(np.concatenate(chunks), k)
    mined = MinedNeighbours(total, k, method, time.time() - started, reused=False)
    save(lake, version, nearest, mined)
    return nearest, mined


def nearest_rows(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """int32 [N, k]: each row's k most cosine-similar other rows (itself where the table has
    fewer than k others), and how they were searched."""
    import faiss

    unit = embeddings.astype(np.float32, copy=True)  # normalised in place below
    faiss.normalize_L2(unit)
    index, method = build_index(unit)
    nearest = np.empty((len(unit), k), np.int32)
    for start in range(0, len(unit), SEARCH_BATCH):
        _, found = index.search(unit[start:start + SEARCH_BATCH], min(k + 1, len(unit)))
        nearest[start:start + len(found)] = without_self(found, start, k)
    return nearest, method


def build_index(unit: np.ndarray):
    import faiss

    rows, dim = unit.shape
    if rows <= EXACT_MAX_ROWS:
        index = faiss.IndexFlatIP(dim)
        method = "exact (flat inner product)"
    else:
        lists = int(4 * math.sqrt(rows))
        index = faiss.index_factory(dim, f"IVF{lists}_HNSW{HNSW_LINKS},Flat", faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(rows, min(rows, IVF_TRAIN_PER_LIST * lists), replace=False)
        index.train(unit[np.sort(sample)])
        index.nprobe = IVF_PROBES
        method = f"IVF, {lists} lists found by HNSW, {IVF_PROBES} probed"
    index.add(unit)
    return index, method


def without_self(found: np.ndarray, first_row: int, k: int) -> np.ndarray:
    """Each row's first k found rows that are not the row itself (nor faiss's -1 for none),
    padded with the row itself where fewer were found."""
    own = np.arange(first_row, first_row + len(found))[:, None]
    valid = (found != own) & (found >= 0)
    ranked = np.take_along_axis(found, np.argsort(~valid, axis=1, kind="stable"), 1)
    ranked = np.where(np.arange(ranked.shape[1]) < valid.sum(1, keepdims=True), ranked, own)
    if ranked.shape[1] < k:
        ranked = np.concatenate([ranked, np.repeat(own, k - ranked.shape[1], 1)], 1)
    return ranked[:, :k].astype(np.int32)


def save(lake: Lake, version: str, nearest: np.ndarray, mined: MinedNeighbours) -> None:
    """Parts first, ``meta.json`` last: a run that finds the meta finds every part."""
    for part, start in enumerate(range(0, len(nearest), PART_ROWS)):
        block = nearest[start:start + PART_ROWS]
        lists = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), block.shape[1])
        table = pa.table({"row": pa.array(np.arange(start, start + len(block))),
                          "neighbours": lists.cast(pa.list_(pa.int32()))})
        path = lake.path(NEIGHBOURS, version, f"part-{part:05d}.parquet")
        if lake.is_local:
            lake.arrow_fs.create_dir(path.rsplit("/", 1)[0])
        pq.write_table(table, path, filesystem=lake.arrow_fs)
    lake.write_json({"rows": mined.rows, "k": mined.k, "method": mined.method, "seconds": round(mined.seconds, 3),
                     "parts": math.ceil(len(nearest) / PART_ROWS)}, NEIGHBOURS, version, META_FILE)


def read_saved(lake: Lake, version: str, total: int, k: int) -> tuple[np.ndarray, str] | None:
    """Neighbours mined earlier for this version of the table with at least k per row, if any."""
    meta = lake.read_json(NEIGHBOURS, version, META_FILE)
    if not meta or meta["rows"] != total or meta["k"] < k:
        return None
    parts = [pq.read_table(lake.path(NEIGHBOURS, version, f"part-{part:05d}.parquet"), columns=["neighbours"],
                           filesystem=lake.arrow_fs).column("neighbours") for part in range(meta["parts"])]
    nearest = np.concatenate([pa.concat_arrays(p.chunks).flatten().to_numpy().reshape(-1, meta["k"])
                              for p in parts])
    return nearest[:, :k].astype(np.int32), meta["method"]


class Neighbours:
    """A worker's view of a ``NeighbourStore``: the arrays mapped from its node's object store."""

    def __init__(self, store: NeighbourStore):
        self.starts = np.asarray(store.starts, np.int64)
        self.chunks = ray.get(list(store.chunks))
        self.nearest = ray.get(store.nearest)
        self.k = store.k

    def pick(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float32 [len(rows), D]: the clean embedding of one of each row's neighbours, drawn at random."""
        chosen = self.nearest[rows, rng.integers(self.k, size=len(rows))].astype(np.int64)
        chunk = np.searchsorted(self.starts, chosen, side="right") - 1
        out = np.empty((len(rows), self.chunks[0].shape[1]), np.float32)
        for c in np.unique(chunk):
            mine = chunk == c
            out[mine] = self.chunks[c][chosen[mine] - self.starts[c]]
        return out
