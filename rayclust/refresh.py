"""Keep the lake fresh: embed and label only the shards that are new or changed since last time.

Under the lake's lock: list the source, compare it with the manifest, and run one streaming
pipeline over the new and changed shards (at most ``max_shards`` of them): read, decode, embed,
label with LATEST, stage. Each shard's features, errors and labels are published as soon as the
shard is complete, then its manifest row is written. A crash at any point leaves the unfinished
shards out of the manifest, so the next run redoes them and replaces whatever they had published:
one feature and one label row per good sample, never two. Ends with a summary and the drift
signal (rayclust/drift.py). New labels have ``duplicate_of`` null: near-duplicates are found by
infer, over the whole table (rayclust/duplicates.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rayclust.clusters import centres_for
from rayclust.commit import Output, ShardResult, fingerprint_of, published_path
from rayclust.drift import Drift, baseline, label_stats
from rayclust.errors import UserError
from rayclust.features import embed_shards, labels_fingerprint, shard_fingerprints, source_fingerprint
from rayclust.labels import FEATURE_BATCH_ROWS, LABEL_COLUMNS, labeler_stage
from rayclust.lake import ERRORS, FEATURES, LABELS, Lake, new_write_id, read_sample
from rayclust.lock import DEFAULT_TTL_S, LakeLock
from rayclust.manifest import (SourceShard, compact_manifest, list_source, manifest_entry, plan_refresh,
                               read_manifest, record_shards)
from rayclust.models.checkpoint import CONFIG_FILE, latest_model, load_model
from rayclust.refresh_history import RefreshRecord, now_utc, write_refresh_record
from rayclust.runtime import init_ray, require_shared

EXIT_DRIFT = 3
EXIT_FAILED_SHARDS = 4


@dataclass
class RefreshSettings:
    shards: str
    lake: str
    batch_size: int = 256
    infer_batch_size: int = FEATURE_BATCH_ROWS
    max_shards: int | None = None
    max_confidence_drop: float = 0.1
    max_cluster_shift: float = 0.25
    lock_ttl_s: float = DEFAULT_TTL_S
    thumbnails: bool = True


@dataclass
class RefreshReport:
    model_version: str
    seen: int = 0
    new: int = 0
    changed: int = 0
    skipped: int = 0
    gone: int = 0
    deferred: int = 0
    adopted: int = 0
    samples: int = 0
    bad_samples: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    drift: Drift | None = None

    def exit_code(self, fail_on_drift: bool) -> int:
        if self.failures:
            return EXIT_FAILED_SHARDS
        return EXIT_DRIFT if fail_on_drift and self.drift and self.drift.detected else 0

    def __str__(self) -> str:
        rows = [
            ("shards seen", self.seen, ""),
            ("new", self.new, ""),
            ("changed", self.changed, "size or ETag/mtime differ from the manifest"),
            ("skipped", self.skipped, "unchanged since they were processed"),
            ("adopted", self.adopted, "new here, but embed and infer had done them: recorded, not redone"),
            ("deferred", self.deferred, "over --max-shards: the next run takes them"),
            ("failed", len(self.failures), "not recorded: the next refresh retries them"),
            ("gone", self.gone, "in the manifest, not in the source: their rows are kept"),
            ("samples labelled", self.samples, f"with {self.model_version}"),
            ("bad samples", self.bad_samples, "recorded in errors/"),
            ("time", f"{self.seconds:.1f}s", ""),
        ]
        lines = ["refresh summary"] + [f"  {name:<17} {value!s:>8}  {note}".rstrip() for name, value, note in rows]
        lines += [f"  failed {shard}: {reason}" for shard, reason in sorted(self.failures.items())]
        if self.drift is not None:
            lines.append(str(self.drift))
        return "\n".join(lines)


def feature_settings(lake: Lake, features: dict[str, str], latest: dict) -> tuple[str, int]:
    """(encoder spec, augmented views) of the feature table (shard -> file): new shards must match it."""
    row = read_sample(lake, features, ["encoder", "views"], 1)
    if row.num_rows == 0:
        raise UserError(f"no features in {lake.uri}: run jobs/embed.py and jobs/train.py first")
    encoder, views = row.column("encoder")[0].as_py(), len(row.column("views")[0])
    trained_on = (lake.read_json(latest["checkpoint"], CONFIG_FILE) or {}).get("encoder")
    if trained_on not in (None, encoder):
        raise UserError(f"LATEST model {latest['model_version']} was trained on {trained_on} features but "
                        f"the feature table holds {encoder} features: retrain before refreshing")
    return encoder, views


def refresh(settings: RefreshSettings) -> RefreshReport:
    """Process the new and changed shards of ``settings.shards`` into ``settings.lake``."""
    started = time.time()
    source = list_source(settings.shards)
    lake = Lake.open(settings.lake)
    latest = latest_model(lake)
    model = load_model(lake, latest)  # once, here: a damaged model fails in one line; the labelers get it
    with LakeLock(lake, "refresh", settings.lock_ttl_s) as lock:  # before Ray: a refused job costs seconds
        init_ray()
        require_shared(lake.uri, "lake")
        if lock.took_over:
            print(f"took over the stale lock of {lock.took_over.describe()}", flush=True)
        report = refresh_locked(lake, lock, source, latest, model, settings)
        write_refresh_record(lake, refresh_record(report))
    report.seconds = time.time() - started
    return report


def refresh_record(report: RefreshReport) -> RefreshRecord:
    drift = report.drift
    new, reference = (drift.new, drift.baseline) if drift else (None, None)
    return RefreshRecord(now_utc(), report.model_version, report.new, report.changed, report.samples,
                         report.bad_samples, len(report.failures), new.mean_confidence if new else None,
                         reference.mean_confidence if reference else None,
                         drift.cluster_shift if drift and new and reference else None,
                         bool(drift and drift.detected))


def refresh_locked(lake: Lake, lock: LakeLock, source: list[SourceShard], latest: dict, model: torch.nn.Module,
                   settings: RefreshSettings) -> RefreshReport:
    write_id = new_write_id()
    lake.discard_staging(keep=write_id)
    compact_manifest(lake)  # what a crashed run recorded shard by shard
    plan = plan_refresh(source, read_manifest(lake))
    # this job's one listing of each table: what it publishes, it knows without listing again
    features, labels = (lake.newest_files(FEATURES), lake.newest_files(LABELS)) if plan.todo else ({}, {})
    encoder, views = feature_settings(lake, features, latest) if plan.todo else ("", 0)
    adopted = adopt_done_shards(lake, plan.new, encoder, views, latest, write_id, features, labels)
    pending = [s for s in plan.todo if s.name not in adopted]
    todo = pending[:settings.max_shards]
    report = RefreshReport(latest["model_version"], len(source), len(plan.new), len(plan.changed),
                           len(plan.unchanged), len(plan.gone), len(pending) - len(todo), len(adopted))
    print(f"refresh {lake.uri}: {len(source)} shards, {len(todo)} to process "
          f"({report.new} new, {report.changed} changed, {report.adopted} adopted, {report.deferred} deferred)",
          flush=True)
    done = process_shards(lake, lock, todo, latest, model, report, settings, write_id, encoder, views) if todo else {}
    compact_manifest(lake)
    report.drift = drift_of(lake, {**labels, **done}, latest, list(done), settings)
    return report


def adopt_done_shards(lake: Lake, new: list[SourceShard], encoder: str, views: int, latest: dict,
                      write_id: str, features: dict[str, str], labels: dict[str, str]) -> set[str]:
    """Record, without redoing them, the new shards whose features were made from the same file
    with the table's encoder and views and whose labels come from LATEST on those features (the
    usual start: embed, train, infer, then the first scheduled refresh)."""
    done = [s for s in new if s.name in features and s.name in labels
            and fingerprint_of(features[s.name]) == source_fingerprint(s, encoder, views)
            and fingerprint_of(labels[s.name]) == labels_fingerprint(latest["model_version"], features[s.name])]
    if not done:
        return set()
    errors = lake.newest_files(ERRORS)
    samples = lake.footer_rows([features[s.name] for s in done])
    erring = [s.name for s in done if s.name in errors]
    bad_rows = dict(zip(erring, lake.footer_rows([errors[name] for name in erring])))
    bad = [bad_rows.get(s.name, 0) for s in done]
    record_shards(lake, write_id, [manifest_entry(s, n, b, encoder, latest["model_version"])
                                   for s, n, b in zip(done, samples, bad)])
    return {s.name for s in done}


def process_shards(lake: Lake, lock: LakeLock, todo: list[SourceShard], latest: dict, model: torch.nn.Module,
                   report: RefreshReport, settings: RefreshSettings, write_id: str, encoder: str,
                   views: int) -> dict[str, str]:
    """One pipeline over ``todo``; each shard's manifest row is written once it is published.
    Returns the label file of each shard done (shard -> path)."""
    by_name = {s.name: s for s in todo}
    done: dict[str, str] = {}

    def record(result: ShardResult) -> None:
        lock.check()
        shard = by_name[result.shard]
        record_shards(lake, write_id, [manifest_entry(shard, result.rows, result.bad, encoder,
                                                      latest["model_version"])])
        labels = shard_fingerprints(shard, encoder, views, write_id, latest["model_version"])[LABELS]
        done[result.shard] = published_path(lake, LABELS, result.shard, write_id, labels)

    committed = embed_shards(lake, lock, todo, encoder, views, settings.batch_size, write_id, settings.thumbnails,
                             extra=(labeler_stage(model, latest, settings.infer_batch_size,
                                                  centres_for(lake, latest, model)),),
                             outputs=(Output(LABELS, LABEL_COLUMNS),), on_published=record,
                             labelled_by=latest["model_version"])
    report.samples, report.bad_samples, report.failures = committed.rows, committed.bad, committed.failures
    return done


def drift_of(lake: Lake, label_files: dict[str, str], latest: dict, shards: list[str],
             settings: RefreshSettings) -> Drift:
    """The new shards' labels against the model's baseline; ``label_files`` as after this run."""
    new = label_stats(lake, label_files, latest["model_version"], latest["clusters"], shards) if shards else None
    reference = baseline(lake, label_files, latest, shards) if new else None
    return Drift(reference, new, settings.max_confidence_drop, settings.max_cluster_shift)
