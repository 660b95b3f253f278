"""Each refresh leaves a record: ``LAKE/refreshes/<finished at, to the microsecond>.json`` (shards
added, samples, drift), so the report can show the drift signal over time without re-deriving it."""
from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass

from rayclust.lake import Lake

REFRESHES = "refreshes"
HISTORY_SHOWN = 100  # the newest records a report reads


@dataclass
class RefreshRecord:
    finished_at: str
    model_version: str
    new: int
    changed: int
    samples: int
    bad_samples: int
    failed: int
    mean_confidence: float | None  # of the new shards' labels
    baseline_confidence: float | None
    cluster_shift: float | None
    drift_detected: bool


def write_refresh_record(lake: Lake, record: RefreshRecord) -> None:
    """Named by the time it is written: names sort in time order and two runs never share one."""
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S.%fZ")
    lake.write_json(asdict(record), REFRESHES, f"{written}.json")


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_refresh_history(lake: Lake) -> list[RefreshRecord]:
    """The newest HISTORY_SHOWN records, oldest first."""
    folder = lake.path(REFRESHES)
    lake.fs.invalidate_cache(folder)
    names = sorted(p.rsplit("/", 1)[-1] for p in lake.fs.glob(f"{folder}/*.json"))[-HISTORY_SHOWN:]
    return [RefreshRecord(**lake.read_json(REFRESHES, name)) for name in names]
