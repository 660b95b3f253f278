"""The lake: a local folder or an ``s3://`` prefix holding rayclust's Parquet tables.

Layout (the contract is docs/lake.md)::

    LAKE/features/shard=<name>/<write-id>.parquet   embeddings of every good sample
    LAKE/labels/shard=<name>/<write-id>.parquet     key -> cluster, confidence, model_version
    LAKE/errors/shard=<name>/<write-id>.parquet     samples that were skipped, with a reason
    LAKE/manifest/manifest.parquet                  shards that refresh has processed
    LAKE/models/<run>/checkpoint_*/                 Ray Train checkpoints
    LAKE/models/LATEST                              JSON pointer to the newest finished model
    LAKE/evaluation/kmeans-<version>-k<K>.json      the k-means baseline of a feature table version
    LAKE/_staging/<write-id>/                       a job's files before they are published
    LAKE/_lock                                      which job is writing the lake (rayclust/lock.py)

A job stages pieces under ``_staging/<write-id>/`` and publishes each shard as soon as it is
complete: one file per shard and table, moved into place, then the shard's older files deleted
(``rayclust/commit.py``).

Every request to an object store is retried by its client, with exponential backoff, long
enough to ride out a restart of the store and no longer (docs/lake.md, "When the store does
not answer"); nothing retries on top of the clients.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import traceback
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FEATURES = "features"
LABELS = "labels"
ERRORS = "errors"
MODELS = "models"
MANIFEST = "manifest"
NEIGHBOURS = "neighbours"
EVALUATION = "evaluation"
STAGING = "_staging"
WRITE_ID = "write_id"
FOOTER_READS = 32  # concurrent footer reads: each waits on the store, not the CPU
# pyarrow (Parquet, listings, checkpoints): AWS's default strategy retries at once, then after
# 50 ms, doubling, without jitter: the last of 11 retries comes 51 s after the first failure.
ARROW_S3_RETRIES = 11
# botocore through s3fs (moves, deletes, the lock, JSON): its standard mode waits a random share
# of 1 s, doubling, at most 20 s, before each retry: 10 attempts give up after 84 s on average and
# 111 s at most (within 30 s: about one time in 10,000). A connection is given 5 s, not botocore's
# 60, so that an endpoint that does not answer at all is given up within minutes too.
BOTO_S3_ATTEMPTS = 10
BOTO_S3_OPTIONS = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": BOTO_S3_ATTEMPTS},
                                     "connect_timeout": 5}}
# what the clients say once they have given up connecting: pyarrow's, botocore's (s3fs passes it on)
UNREACHABLE = ("AWS Error NETWORK_CONNECTION", "Could not connect to the endpoint URL",
               "Connect timeout on endpoint URL")


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and scheme-less path for a local path or URL.

    S3 endpoint and credentials come from the standard AWS environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE).
    """
    options = BOTO_S3_OPTIONS if fsspec.utils.get_protocol(uri) in ("s3", "s3a") else {}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol


def to_pyarrow(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow's own filesystem for the same store, for Parquet reads and writes and listings
    (the native S3 client, configured from the same AWS environment as s3fs)."""
    if is_local(fs):
        return pafs.LocalFileSystem()
    if "s3" in fs.protocol:
        return native_s3()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 client that keeps its retry strategy when pickled (pyarrow's own pickling drops
    it, so Ray tasks and Ray Train workers retried 3 times in all): unpickled, it is made again
    from the environment of the process it lands in, as s3fs is."""

    def __reduce__(self):
        return native_s3, ()


def native_s3() -> RetryingS3FileSystem:
    options: dict[str, Any] = {"retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=ARROW_S3_RETRIES)}
    if endpoint := s3_endpoint():
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if region := s3_region():
        options["region"] = region
    return RetryingS3FileSystem(**options)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def store_unreachable(exn: BaseException) -> bool:
    """Whether ``exn`` is, or wraps, an S3 request that gave up connecting after its retries. Read
    from the text, causes included: Ray passes on a task's or worker's error as its traceback."""
    text = "".join(traceback.format_exception(exn))
    return any(marker in text for marker in UNREACHABLE)


def unreachable_store_message() -> str:
    """The one line a job ends with when its object store stays down."""
    where = s3_endpoint() or f"AWS S3 ({s3_region() or 'default region'})"
    return (f"the object store at {where} does not answer (gave up after retrying for a minute or two): "
            f"run the job again once it is back; it redoes what it had not published")


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

    @functools.cached_property
    def arrow_fs(self) -> pafs.FileSystem:
        return to_pyarrow(self.fs)

    @property
    def is_local(self) -> bool:
        return is_local(self.fs)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def newest_files(self, table: str) -> dict[str, str]:
        """shard -> the path of its newest file in ``table``: one recursive listing of the table,
        by pyarrow, so no listing cache can hide another process's writes. A job lists each
        table once and passes what it found along.

        A partition holds one file, or, for a moment during a publish (or after a crash in
        one), also an older one: the newest write id is the complete one.
        """
        by_shard: dict[str, list[str]] = defaultdict(list)
        selector = pafs.FileSelector(self.path(table), recursive=True, allow_not_found=True)
        for info in self.arrow_fs.get_file_info(selector):
            folder, name = info.path.rsplit("/", 2)[-2:]
            if info.type == pafs.FileType.File and name.endswith(".parquet") and folder.startswith("shard="):
                by_shard[folder.split("=", 1)[1]].append(info.path)
        return {shard: max(paths, key=lambda p: p.rsplit("/", 1)[-1]) for shard, paths in sorted(by_shard.items())}

    def partition_files(self, table: str, shard: str) -> list[str]:
        """The files of one shard's partition, listed with pyarrow (workers use this)."""
        selector = pafs.FileSelector(self.path(table, f"shard={shard}"), allow_not_found=True)
        return sorted(info.path for info in self.arrow_fs.get_file_info(selector) if info.path.endswith(".parquet"))

    def discard_staging(self, keep: str) -> None:
        """Delete ``_staging/`` except write ``keep``'s. Only the lake lock's holder calls this:
        every other write there belongs to a job whose lease has expired, so it can never
        publish it (its pieces no longer add up)."""
        self.fs.invalidate_cache(self.path(STAGING))
        for entry in self.fs.ls(self.path(STAGING)) if self.fs.exists(self.path(STAGING)) else []:
            if entry.rstrip("/").rsplit("/", 1)[-1] != keep:
                self.fs.rm(entry, recursive=True)

    def discard_write(self, write_id: str) -> None:
        path = self.path(STAGING, write_id)
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def footer_rows(self, paths: list[str]) -> list[int]:
        """Each Parquet file's row count, from its footer (no rows read), FOOTER_READS at a time."""
        with ThreadPoolExecutor(FOOTER_READS) as pool:
            return list(pool.map(lambda p: pq.ParquetFile(p, filesystem=self.arrow_fs).metadata.num_rows, paths))

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


def table_version(files: dict[str, str]) -> str:
    """A fingerprint of a table's state from its listing (shard -> newest file): any write of a
    shard names a new file, so it changes whenever the table does."""
    listing = "\n".join(f"{shard}:{files[shard].rsplit('/', 1)[-1]}" for shard in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def new_write_id() -> str:
    """Sorts by time: a later write of a shard has a larger id."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def list_to_numpy(column: pa.ChunkedArray | pa.Array, *inner: int, copy: bool = True) -> np.ndarray:
    """A column of equal-length (nested) float lists as one float32 array [rows, *inner]; without
    ``copy``, a float32 column's array is a read-only view of Arrow's memory."""
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    for _ in inner:
        flat = pc.list_flatten(flat)
    return flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=copy).reshape(len(column), *inner)


def read_sample(lake: Lake, files: dict[str, str], columns: list[str], max_rows: int,
                with_shard: bool = False) -> pa.Table:
    """The first ``max_rows`` rows of a table whose files (shard -> path) were listed, read on the
    driver (for evaluation and schemas): file after file until there are enough, so it costs the
    same for any size of table."""
    pieces, rows = [], 0
    for shard, path in files.items():
        piece = pq.read_table(path, columns=columns, filesystem=lake.arrow_fs)
        if with_shard:
            piece = piece.append_column("shard", pa.array([shard] * piece.num_rows, pa.string()))
        pieces.append(piece.slice(0, max_rows - rows))
        rows += pieces[-1].num_rows
        if rows >= max_rows:
            break
    return pa.concat_tables(pieces) if pieces else pa.table({c: pa.array([], pa.null()) for c in columns})
