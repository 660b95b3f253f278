"""Shards become samples: list WebDataset ``.tar`` shards and read them with Ray Data.

Only raw bytes leave the reader; images are decoded later, with PIL, by our own code.
Nothing from a shard is ever unpickled or ``torch.load``-ed: shards are untrusted.
"""
from __future__ import annotations

import glob as globlib
import json
import posixpath
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import braceexpand
import numpy as np
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from rayclust.errors import UserError
from rayclust.lake import filesystem_for, to_pyarrow

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm", "tif", "tiff")
SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("label", pa.int64()),
        ("image", pa.binary()),
        ("error", pa.string()),
        ("shard_rows", pa.int64()),
        ("source", pa.string()),
    ]
)
SOURCE_FIELDS = ("source", "url")  # a sample's .json: folder2shards writes "source", img2dataset "url"
MAX_SOURCE_CHARS = 4096
WHOLE_SHARD_KEY = "__shard__"
END_OF_SHARD = "end of shard"  # the error of a shard's last row, which counts the rows before it
ROWS_PER_BLOCK = 256
EXISTENCE_CHECKS = 32  # concurrent HEAD requests for a brace pattern's shards
READ_CPUS = 0.25  # reading waits on the store; a whole CPU per read task starved decoding on small clusters
# a shard's name is its partition's: Hive readers (pyarrow, Spark) decode %XX in it, and fsspec's
# copies on S3 read * ? [ ] as a glob
UNSAFE_IN_SHARD_NAMES = frozenset("%*?[]\\")


def shard_name(uri: str) -> str:
    """The shard's partition name in the lake: its file name without ``.tar``."""
    name = posixpath.basename(uri.rstrip("/"))
    return name[: -len(".tar")] if name.endswith(".tar") else name


def check_shard_name(uri: str) -> None:
    """Refuse a shard whose name would not read back as written from its partition's path."""
    name = shard_name(uri)
    unsafe = sorted({c for c in name if c in UNSAFE_IN_SHARD_NAMES or not c.isprintable()})
    if not name:
        raise UserError(f"shard {uri!r}: an empty file name cannot name a lake partition: rename the file")
    if unsafe:
        raise UserError(f"shard {uri!r}: its file name holds {' '.join(map(repr, unsafe))}, which a lake partition's "
                        f"name cannot ({' '.join(sorted(UNSAFE_IN_SHARD_NAMES))} and control characters): "
                        f"rename the file")


def expand_shards(pattern: str) -> list[str]:
    """Concrete shard URIs for a brace range and/or glob, e.g. ``s3://b/raw/{000..009}.tar``.

    Named shards are checked concurrently: 10,000 of them on S3 take seconds, not minutes.
    """
    fs, _ = filesystem_for(pattern)
    scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    paths = [filesystem_for(candidate)[1] for candidate in braceexpand.braceexpand(pattern)]

    def matches(path: str) -> list[str]:
        if globlib.has_magic(path):
            return sorted(fs.glob(path))
        if not fs.isfile(path):
            raise UserError(f"shard not found: {scheme}{path}")
        return [path]

    with ThreadPoolExecutor(EXISTENCE_CHECKS) as pool:
        uris = [scheme + m for found in pool.map(matches, paths) for m in found]
    if not uris:
        raise UserError(f"no shards match {pattern}")
    for uri in uris:
        check_shard_name(uri)
    names = [shard_name(u) for u in uris]
    if len(set(names)) != len(names):
        raise UserError(f"two shards share a file name in {pattern}; shard names must be unique")
    return uris


def read_shards(uris: list[str]) -> ray.data.Dataset:
    """A Dataset of ``SAMPLE_SCHEMA`` rows, one per sample (or per unreadable shard tail), and each
    shard's end row (``rows_of_shard``)."""
    fs, _ = filesystem_for(uris[0])
    paths = [filesystem_for(u)[1] for u in uris]
    return ray.data.read_datasource(SampleReader(paths, filesystem=to_pyarrow(fs)),
                                    num_cpus=READ_CPUS)


class SampleReader(FileBasedDatasource):
    """Ray Data datasource over WebDataset shards that survives damaged tars.

    webdataset's own tar iterator and key grouping do the parsing; a tar that ends
    early keeps the samples read so far, and the shard gets an error row saying why.
    """

    _FILE_EXTENSIONS = ["tar"]

    def _read_stream(self, stream: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        for row in rows_of_shard(stream, path):
            rows.append(row)
            if len(rows) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def count_images(uris: list[str], at_most: int) -> int:
    """How many samples with an image member the shards hold, reading them in order only until
    ``at_most`` are seen: a check on the driver that costs a shard or so, whatever the corpus."""
    seen = 0
    for uri in uris:
        fs, path = filesystem_for(uri)
        with fs.open(path, "rb") as stream:
            for row in samples_of_tar(stream, path):
                seen += "image" in row
                if seen >= at_most:
                    return seen
    return seen


def samples_of_tar(stream, path: str) -> Iterator[dict]:
    """Rows for each sample of one tar stream, an error row for each member that is no sample's
    (its name as the key: plain data, like every key), then one error row if the tar is damaged."""
    # here: webdataset imports torch, which publishers never need
    from webdataset.tariterators import base_plus_ext, group_by_keys

    shard = shard_name(path)
    damage: list[str] = []
    skipped: list[tuple[str, str]] = []  # (member name, reason)

    def stop_on_damage(exn: Exception) -> bool:
        damage.append(f"{type(exn).__name__}: {exn}")
        return False

    def sample_key(name: str) -> tuple[str | None, str | None]:
        key, suffix = base_plus_ext(name)
        if key is None:  # webdataset would drop it without a word
            skipped.append((name, f"member without a sample key: {name!r}"))
        return key, suffix

    for sample in group_by_keys(tar_members(stream, path, damage, skipped), keys=sample_key, handler=stop_on_damage):
        yield sample_row(sample, shard)
    for name, reason in skipped:
        yield {"key": name, "shard": shard, "error": reason}
    if damage:
        yield {"key": WHOLE_SHARD_KEY, "shard": shard, "error": f"damaged tar: {damage[0]}"}


def rows_of_shard(stream, path: str) -> Iterator[dict]:
    """``samples_of_tar``, then the shard's end row: ``shard_rows`` counts the rows before it, so
    whoever writes the shard's output knows when it has all of it."""
    count = 0
    for row in samples_of_tar(stream, path):
        count += 1
        yield row
    yield {"key": WHOLE_SHARD_KEY, "shard": shard_name(path), "error": END_OF_SHARD, "shard_rows": count}


def tar_members(stream, path: str, damage: list[str], skipped: list[tuple[str, str]]) -> Iterator[dict]:
    """The regular files of a tar stream as webdataset's ``{fname, data, __url__}``; other members
    but folders (links, devices) go to ``skipped``, never followed. A tar that breaks, or ends
    without its end-of-archive marker (an upload cut off between two members, which tarfile reads
    as a normal end), adds a line to ``damage``."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if info.isreg():
                    yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": path}
                elif not info.isdir():
                    skipped.append((info.name, f"not a regular file: {info.name!r}"))
            if not ends_with_marker(tar):
                damage.append("cut short: no end-of-archive marker after the last member")
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exn:
        damage.append(f"{type(exn).__name__}: {exn}")


def ends_with_marker(tar: tarfile.TarFile) -> bool:
    """Whether the header tarfile stopped at was a full zero block followed by another one.

    tarfile ends the same way at the marker and at a stream that simply stops; the position
    tells them apart: after the marker's first block it has read exactly one block past the
    last member, and the second block follows.
    """
    stream = tar.fileobj
    if stream.tell() != tar.offset + tarfile.BLOCKSIZE:
        return False
    second = stream.read(tarfile.BLOCKSIZE)
    return len(second) == tarfile.BLOCKSIZE and not any(second)


def sample_row(sample: dict, shard: str) -> dict:
    row = {"key": sample["__key__"], "shard": shard, "label": parse_label(sample.get("cls")),
           "source": parse_source(sample.get("json"))}
    image_suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
    if image_suffix is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        row["error"] = f"no image member (has {', '.join(members) or 'nothing'})"
    else:
        row["image"] = sample[image_suffix]
    return row


def parse_source(raw: bytes | None) -> str | None:
    """Where the image came from (a path or URL), from the sample's ``.json``; None when it says
    nothing usable. Plain JSON, never executed; a long value is cut to MAX_SOURCE_CHARS."""
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return None
    source = next((meta[f] for f in SOURCE_FIELDS if isinstance(meta.get(f), str) and meta[f]), None)
    return source[:MAX_SOURCE_CHARS] if source else None


def sources_as_numpy(batch: pa.Table) -> np.ndarray:
    """A sample batch's sources for a stage's numpy output, "" for none (Ray turns all-None columns into NaN)."""
    return np.array([s or "" for s in batch.column("source").to_pylist()], dtype=object)


def parse_label(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        return None
