"""The lake: a local folder or an ``s3://`` prefix holding rayclust's Parquet tables.

Layout (see ARCHITECTURE.md)::

    LAKE/features/shard=<name>/<write-id>.parquet   embeddings of every good sample
    LAKE/labels/shard=<name>/<write-id>.parquet     key -> cluster, confidence, model_version
    LAKE/errors/shard=<name>/<write-id>.parquet     samples that were skipped, with a reason
    LAKE/models/<run>/checkpoint_*/                 Ray Train checkpoints
    LAKE/models/LATEST                              JSON pointer to the newest finished model
"""
from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
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

    def drop_partitions(self, table: str, shards: Iterable[str]) -> None:
        for shard in shards:
            partition = self.path(table, f"shard={shard}")
            if self.fs.exists(partition):
                self.fs.rm(partition, recursive=True)

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


class PartitionedSink(Datasink[dict]):
    """Writes each block's rows to ``table/shard=<name>/`` of the lake, one file per shard.

    Rows whose ``error`` column is set go to the errors table instead, so one pass
    over the data writes both. The shard column lives in the path (Hive style), as
    Spark, DuckDB and pyarrow expect. ``write`` returns counts for the job summary.
    """

    def __init__(self, lake: Lake, table: str, stage: str):
        self.lake = lake
        self.table = table
        self.stage = stage

    def write(self, blocks: Iterable, ctx) -> dict:
        counts = {"rows": 0, "errors": 0, "reasons": Counter()}
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
                counts["rows"] += good.num_rows
                counts["errors"] += bad.num_rows
                counts["reasons"].update(r.split(":")[0] for r in bad.column("error").to_pylist())
        return counts

    def _as_errors(self, bad: pa.Table) -> pa.Table:
        stage = pa.array([self.stage] * bad.num_rows, pa.string())
        return pa.table([bad.column("key"), bad.column("error"), stage], schema=ERROR_SCHEMA)

    def _write(self, table: str, shard: str, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        directory = self.lake.path(table, f"shard={shard}")
        self.lake.fs.makedirs(directory, exist_ok=True)
        pq.write_table(rows, f"{directory}/{uuid.uuid4().hex}.parquet", filesystem=self.lake.arrow_fs)

    def on_write_complete(self, write_result) -> None:
        returns = write_result.write_returns
        self.rows_written = sum(r["rows"] for r in returns)
        self.errors_written = sum(r["errors"] for r in returns)
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
