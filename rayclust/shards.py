"""Shards become samples: list WebDataset ``.tar`` shards and read them with Ray Data.

Only raw bytes leave the reader; images are decoded later, with PIL, by our own code.
Nothing from a shard is ever unpickled or ``torch.load``-ed: shards are untrusted.
"""
from __future__ import annotations

import glob as globlib
import posixpath
import tarfile
from typing import Iterator

import braceexpand
import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource
from webdataset.tariterators import group_by_keys, tar_file_iterator

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
    ]
)
WHOLE_SHARD_KEY = "__shard__"
ROWS_PER_BLOCK = 256


def shard_name(uri: str) -> str:
    """The shard's partition name in the lake: its file name without ``.tar``."""
    name = posixpath.basename(uri.rstrip("/"))
    return name[: -len(".tar")] if name.endswith(".tar") else name


def expand_shards(pattern: str) -> list[str]:
    """Concrete shard URIs for a brace range and/or glob, e.g. ``s3://b/raw/{000..009}.tar``."""
    fs, _ = filesystem_for(pattern)
    scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
    uris: list[str] = []
    for candidate in braceexpand.braceexpand(pattern):
        _, path = filesystem_for(candidate)
        matches = fs.glob(path) if globlib.has_magic(path) else ([path] if fs.isfile(path) else [])
        if not matches and not globlib.has_magic(path):
            raise UserError(f"shard not found: {candidate}")
        uris += [scheme + m if scheme else m for m in sorted(matches)]
    if not uris:
        raise UserError(f"no shards match {pattern}")
    names = [shard_name(u) for u in uris]
    if len(set(names)) != len(names):
        raise UserError(f"two shards share a file name in {pattern}; shard names must be unique")
    return uris


def read_shards(uris: list[str]) -> ray.data.Dataset:
    """A Dataset of ``SAMPLE_SCHEMA`` rows, one per sample (or per unreadable shard tail)."""
    fs, _ = filesystem_for(uris[0])
    paths = [filesystem_for(u)[1] for u in uris]
    return ray.data.read_datasource(SampleReader(paths, filesystem=to_pyarrow(fs)))


class SampleReader(FileBasedDatasource):
    """Ray Data datasource over WebDataset shards that survives damaged tars.

    webdataset's own tar iterator and key grouping do the parsing; a tar that ends
    early keeps the samples read so far, and the shard gets an error row saying why.
    """

    _FILE_EXTENSIONS = ["tar"]

    def _read_stream(self, stream: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        for row in samples_of_tar(stream, path):
            rows.append(row)
            if len(rows) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def samples_of_tar(stream, path: str) -> Iterator[dict]:
    """Rows for each sample of one tar stream, then one error row if the tar is damaged."""
    shard = shard_name(path)
    damage: list[str] = []

    def stop_on_damage(exn: Exception) -> bool:
        damage.append(f"{type(exn).__name__}: {exn}")
        return False

    def files() -> Iterator[dict]:
        try:
            for member in tar_file_iterator(stream, handler=stop_on_damage):
                member["__url__"] = path
                yield member
        except (tarfile.TarError, EOFError, OSError, ValueError) as exn:
            stop_on_damage(exn)

    for sample in group_by_keys(files(), handler=stop_on_damage):
        yield sample_row(sample, shard)
    if damage:
        yield {"key": WHOLE_SHARD_KEY, "shard": shard, "error": f"damaged tar: {damage[0]}"}


def sample_row(sample: dict, shard: str) -> dict:
    row = {"key": sample["__key__"], "shard": shard, "label": parse_label(sample.get("cls"))}
    image_suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
    if image_suffix is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        row["error"] = f"no image member (has {', '.join(members) or 'nothing'})"
    else:
        row["image"] = sample[image_suffix]
    return row


def parse_label(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        return None
