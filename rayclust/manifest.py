"""The manifest: which source shards refresh has processed, as one Parquet file in the lake.

``LAKE/manifest/manifest.parquet`` holds one row per shard (``MANIFEST_SCHEMA``). While refresh
runs, each shard's row lands as a file of its own (``manifest/<write-id>-<shard>.parquet``) right
after its features and labels are published; at the end of the run all rows are compacted into
``manifest.parquet`` and those files deleted. A reader takes each shard's newest row
(``processed_at``): after a crash the per-shard files stay until the next run compacts them.
A shard is new when its name is not in it, changed when its URI, size or ETag (S3; on local
disks the mtime) differ from the row, and otherwise skipped.
"""
from __future__ import annotations

import datetime
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from rayclust.lake import MANIFEST, Lake, filesystem_for
from rayclust.shards import expand_shards, shard_name

MANIFEST_FILE = "manifest.parquet"
UTC_MICROS = pa.timestamp("us", tz="UTC")
MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("uri", pa.string()),
    ("size", pa.int64()),
    ("etag", pa.string()),
    ("mtime", UTC_MICROS),
    ("samples", pa.int64()),
    ("bad_samples", pa.int64()),
    ("encoder", pa.string()),
    ("model_version", pa.string()),
    ("processed_at", UTC_MICROS),
])


@dataclass(frozen=True)
class SourceShard:
    uri: str
    name: str
    size: int
    etag: str | None
    mtime: datetime.datetime | None

    def same_as(self, entry: dict) -> bool:
        """Unchanged since ``entry`` was recorded: same URI and size, and same ETag (else mtime)."""
        if (self.uri, self.size) != (entry["uri"], entry["size"]):
            return False
        if self.etag is not None and entry["etag"] is not None:
            return self.etag == entry["etag"]
        return self.mtime == entry["mtime"]


def list_source(pattern: str) -> list[SourceShard]:
    """The shards matching ``pattern`` with their size and ETag or mtime: one listing per folder."""
    uris = expand_shards(pattern)
    fs, _ = filesystem_for(pattern)
    paths = {uri: filesystem_for(uri)[1] for uri in uris}
    infos: dict[str, dict] = {}
    for folder in sorted({posixpath.dirname(p) for p in paths.values()}):
        fs.invalidate_cache(folder)
        infos.update({info["name"].rstrip("/"): info for info in fs.ls(folder, detail=True)})
    return [source_shard(uri, infos[path]) for uri, path in paths.items()]


def source_shard(uri: str, info: dict) -> SourceShard:
    etag = info.get("ETag") or info.get("etag")
    if "LastModified" in info:
        mtime = info["LastModified"]
    elif "mtime" in info:
        mtime = datetime.datetime.fromtimestamp(info["mtime"], datetime.timezone.utc)
    else:
        mtime = None
    if mtime is not None:
        mtime = mtime.astimezone(datetime.timezone.utc)
    return SourceShard(uri, shard_name(uri), int(info["size"]), etag.strip('"') if etag else None, mtime)


def manifest_files(lake: Lake) -> list[str]:
    lake.fs.invalidate_cache(lake.path(MANIFEST))
    return sorted(lake.fs.glob(lake.path(MANIFEST, "*.parquet")))


def read_manifest(lake: Lake, files: list[str] | None = None) -> dict[str, dict]:
    """shard name -> its newest manifest row (empty before the first refresh)."""
    entries: dict[str, dict] = {}
    for path in manifest_files(lake) if files is None else files:
        for row in pq.read_table(path, filesystem=lake.arrow_fs, schema=MANIFEST_SCHEMA).to_pylist():
            if row["shard"] not in entries or row["processed_at"] > entries[row["shard"]]["processed_at"]:
                entries[row["shard"]] = row
    return entries


def record_shards(lake: Lake, write_id: str, entries: list[dict]) -> None:
    """Shards' rows as a file of their own (named after the first), once their features and labels
    are published."""
    rows = pa.Table.from_pylist(entries, schema=MANIFEST_SCHEMA)
    lake.write_parquet(rows, MANIFEST, f"{write_id}-{entries[0]['shard']}.parquet")


def compact_manifest(lake: Lake) -> None:
    """All rows (each shard's newest) into ``manifest.parquet``, then the other files deleted."""
    files = manifest_files(lake)
    if [f.rsplit("/", 1)[-1] for f in files] in ([], [MANIFEST_FILE]):
        return
    entries = read_manifest(lake, files)
    rows = pa.Table.from_pylist([entries[name] for name in sorted(entries)], schema=MANIFEST_SCHEMA)
    lake.write_parquet(rows, MANIFEST, MANIFEST_FILE)
    for path in files:
        if not path.endswith(f"/{MANIFEST_FILE}"):
            lake.fs.rm(path)


def manifest_entry(shard: SourceShard, samples: int, bad_samples: int, encoder: str,
                   model_version: str) -> dict:
    return {
        "shard": shard.name, "uri": shard.uri, "size": shard.size, "etag": shard.etag, "mtime": shard.mtime,
        "samples": samples, "bad_samples": bad_samples, "encoder": encoder, "model_version": model_version,
        "processed_at": datetime.datetime.now(datetime.timezone.utc),
    }


@dataclass
class Plan:
    new: list[SourceShard] = field(default_factory=list)
    changed: list[SourceShard] = field(default_factory=list)
    unchanged: list[SourceShard] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)

    @property
    def todo(self) -> list[SourceShard]:
        return self.new + self.changed


def plan_refresh(source: list[SourceShard], manifest: dict[str, dict]) -> Plan:
    plan = Plan()
    for shard in source:
        entry = manifest.get(shard.name)
        if entry is None:
            plan.new.append(shard)
        elif shard.same_as(entry):
            plan.unchanged.append(shard)
        else:
            plan.changed.append(shard)
    listed = {shard.name for shard in source}
    plan.gone = sorted(name for name in manifest if name not in listed)
    return plan
