"""The lake: a local folder or an ``s3://`` prefix holding rayclust's Parquet tables.

Layout (the contract is docs/lake.md)::

    LAKE/features/shard=<name>/<write-id>.parquet   embeddings of every good sample
    LAKE/labels/shard=<name>/<write-id>.parquet     key -> cluster, confidence, model_version
    LAKE/errors/shard=<name>/<write-id>.parquet     samples that were skipped, with a reason
    LAKE/manifest/manifest.parquet                  shards that refresh has processed
    LAKE/models/<run>/checkpoint_*/                 Ray Train checkpoints
    LAKE/models/LATEST                              JSON pointer to the newest finished model
    LAKE/_staging/<write-id>/                       a job's files before they are published
    LAKE/_lock                                      who is refreshing the lake (rayclust/lock.py)

A job writes into ``_staging/<write-id>/`` and then publishes shard by shard: one file per
shard and table, moved into place, then the shard's older files deleted (``Write.commit``).
"""
from __future__ import annotations

import datetime
import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

FEATURES = "features"
LABELS = "labels"
ERRORS = "errors"
MODELS = "models"
MANIFEST = "manifest"
STAGING = "_staging"
WRITE_ID = "write_id"
COMMIT_THREADS = 16
ERROR_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("stage", pa.string())])


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and scheme-less path for a local path or URL.

    S3 endpoint and credentials come from the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE).
    """
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol


def to_pyarrow(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    if is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


@dataclass(frozen=True)
class Lake:
    uri: str
    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def open(cls, uri: str, create: bool = False) -> "Lake":
        """The lake at ``uri``; ``create`` makes a local lake's folder (object stores need none)."""
        fs, root = filesystem_for(uri)
        if create and is_local(fs):
            fs.makedirs(root, exist_ok=True)
        return cls(uri.rstrip("/"), fs, root)

    @property
    def arrow_fs(self) -> pafs.FileSystem:
        return to_pyarrow(self.fs)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def has_table(self, table: str) -> bool:
        return bool(self.parquet_files(table))

    def parquet_files(self, table: str) -> list[str]:
        return sorted(self.fs.glob(self.path(table, "shard=*", "*.parquet")))

    def partitions(self, table: str) -> list[str]:
        """Shard names that have a partition in ``table``."""
        dirs = self.fs.glob(self.path(table, "shard=*"))
        return sorted(d.rsplit("shard=", 1)[1] for d in dirs)

    def discard_staging(self) -> None:
        """Delete what crashed jobs left in ``_staging/``; only the lock holder may call this."""
        if self.fs.exists(self.path(STAGING)):
            self.fs.rm(self.path(STAGING), recursive=True)

    def read_json(self, *parts: str) -> Any | None:
        path = self.path(*parts)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def write_json(self, value: Any, *parts: str) -> None:
        """Write a small JSON object; readers never see it half-written."""
        path = self.path(*parts)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(tmp, "w") as f:
            json.dump(value, f, indent=2)
        self.fs.mv(tmp, path)

    def write_parquet(self, rows: pa.Table, *parts: str) -> None:
        """Replace one Parquet file whole: written in ``_staging/``, then moved into place."""
        tmp = self.path(STAGING, f"{uuid.uuid4().hex}.parquet")
        self.fs.makedirs(self.path(STAGING), exist_ok=True)
        pq.write_table(rows, tmp, filesystem=self.arrow_fs)
        path = self.path(*parts)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, path)


def new_write_id() -> str:
    """Sorts by time: a later write of a shard has a larger id."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


@dataclass
class Write:
    """One job's output: staged under ``_staging/<id>/``, published shard by shard by ``commit``."""

    lake: Lake
    id: str = field(default_factory=new_write_id)

    def staged(self, table: str, shard: str) -> str:
        return self.lake.path(STAGING, self.id, table, f"shard={shard}")

    def commit(self, shards: Iterable[str], tables: Iterable[str]) -> None:
        """Make this write the content of each shard's partition of each table, then drop the staging.

        Per shard and table: the staged pieces become one file ``<write-id>.parquet`` (with a
        ``write_id`` column), moved into the partition, then the partition's other files are
        deleted. A shard with nothing staged loses its old files: the write replaced them with
        nothing. A crash half-way leaves each partition with its old file, or old and new files
        (the larger write id is complete), never a partial file; re-running the job repairs it.
        """
        self.lake.fs.invalidate_cache(self.lake.path(STAGING, self.id))  # pieces came from Ray workers
        tables = list(tables)
        # Shards are independent and publishing one is a few round trips to the store: overlap them.
        with ThreadPoolExecutor(COMMIT_THREADS) as pool:
            list(pool.map(lambda shard: [self._publish(table, shard) for table in tables], shards))
        self.discard()

    def discard(self) -> None:
        if self.lake.fs.exists(self.lake.path(STAGING, self.id)):
            self.lake.fs.rm(self.lake.path(STAGING, self.id), recursive=True)

    def _publish(self, table: str, shard: str) -> None:
        fs, partition = self.lake.fs, self.lake.path(table, f"shard={shard}")
        old = fs.glob(f"{partition}/*.parquet")
        pieces = sorted(fs.glob(f"{self.staged(table, shard)}/*.parquet"))
        if not pieces:
            if old:
                fs.rm(partition, recursive=True)
            return
        rows = pa.concat_tables([pq.read_table(p, filesystem=self.lake.arrow_fs) for p in pieces])
        rows = rows.append_column(WRITE_ID, pa.array([self.id] * rows.num_rows, pa.string()))
        combined = f"{self.staged(table, shard)}.parquet"
        pq.write_table(rows, combined, filesystem=self.lake.arrow_fs)
        fs.makedirs(partition, exist_ok=True)
        published = f"{partition}/{self.id}.parquet"
        fs.mv(combined, published)
        for path in old:
            if path != published:
                fs.rm(path)


class PartitionedSink(Datasink[dict]):
    """Stages each block's rows for ``table/shard=<name>/``, one file per block and shard.

    Rows whose ``error`` column is set go to the errors table instead, so one pass
    over the data writes both. Nothing is visible in the tables until the caller
    commits ``write``. The shard column lives in the path (Hive style), as Spark,
    DuckDB and pyarrow expect. ``write`` returns per-shard counts for the job summary.
    """

    def __init__(self, lake: Lake, table: str, stage: str, write: Write):
        self.lake = lake
        self.table = table
        self.stage = stage
        self.staging = write

    def write(self, blocks: Iterable, ctx) -> dict:
        counts = {"rows": Counter(), "errors": Counter(), "reasons": Counter()}
        for block in blocks:
            rows = BlockAccessor.for_block(block).to_arrow()
            if rows.num_rows == 0:
                continue
            for shard in set(rows.column("shard").to_pylist()):
                part = rows.filter(pc.equal(rows.column("shard"), shard))
                failed = part.column("error").is_valid()
                good = part.filter(pc.invert(failed))
                bad = part.filter(failed)
                self._write(self.table, shard, good.drop_columns(["shard", "error"]))
                self._write(ERRORS, shard, self._as_errors(bad))
                counts["rows"][shard] += good.num_rows
                counts["errors"][shard] += bad.num_rows
                counts["reasons"].update(r.split(":")[0] for r in bad.column("error").to_pylist())
        return counts

    def _as_errors(self, bad: pa.Table) -> pa.Table:
        stage = pa.array([self.stage] * bad.num_rows, pa.string())
        return pa.table([bad.column("key"), bad.column("error"), stage], schema=ERROR_SCHEMA)

    def _write(self, table: str, shard: str, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        directory = self.staging.staged(table, shard)
        self.lake.fs.makedirs(directory, exist_ok=True)
        pq.write_table(rows, f"{directory}/{uuid.uuid4().hex}.parquet", filesystem=self.lake.arrow_fs)

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        self.rows_by_shard = sum((r["rows"] for r in returns), Counter())
        self.errors_by_shard = sum((r["errors"] for r in returns), Counter())
        self.rows_written = sum(self.rows_by_shard.values())
        self.errors_written = sum(self.errors_by_shard.values())
        self.reasons = sum((r["reasons"] for r in returns), Counter())


def list_to_numpy(column: pa.ChunkedArray | pa.Array, *inner: int) -> np.ndarray:
    """A column of equal-length (nested) float lists as one float32 array [rows, *inner]."""
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    for _ in inner:
        flat = pc.list_flatten(flat)
    return flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), *inner)


def read_sample(lake: Lake, table: str, columns: list[str], max_rows: int) -> pa.Table:
    """The first ``max_rows`` rows of a table, read on the driver (for evaluation and schemas)."""
    pieces, rows = [], 0
    for path in lake.parquet_files(table):
        piece = pq.read_table(path, columns=columns, filesystem=lake.arrow_fs)
        pieces.append(piece.slice(0, max_rows - rows))
        rows += pieces[-1].num_rows
        if rows >= max_rows:
            break
    return pa.concat_tables(pieces)
