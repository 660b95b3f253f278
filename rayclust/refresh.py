"""Keep the lake fresh: embed and label only the shards that are new or changed since last time.

Under the lake's lock: list the source, compare it with the manifest, and process the new and
changed shards in groups. Per group: embed (features and errors published per shard), label
with LATEST through ``labels.infer`` (labels published per shard), then record the group in
the manifest. A crash at any point leaves the group out of the manifest, so the next run
redoes it and replaces whatever it had published: one feature and one label row per good
sample, never two. Ends with a summary and the drift signal (rayclust/drift.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from rayclust.drift import Drift, baseline, label_stats
from rayclust.errors import UserError
from rayclust.features import embed_uris
from rayclust.lake import FEATURES, LABELS, Lake, Write, read_sample
from rayclust.labels import infer, latest_model
from rayclust.lock import DEFAULT_TTL_S, LakeLock
from rayclust.manifest import (SourceShard, list_source, manifest_entry, plan_refresh, read_manifest,
                               write_manifest)
from rayclust.training import CONFIG_FILE

EXIT_DRIFT = 3
EXIT_FAILED_SHARDS = 4


@dataclass
class RefreshSettings:
    shards: str
    lake: str
    batch_size: int = 64
    infer_batch_size: int = 1024
    group_size: int = 8
    max_confidence_drop: float = 0.1
    max_cluster_shift: float = 0.25
    lock_ttl_s: float = DEFAULT_TTL_S


@dataclass
class RefreshReport:
    model_version: str
    seen: int = 0
    new: int = 0
    changed: int = 0
    skipped: int = 0
    gone: int = 0
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


def feature_settings(lake: Lake, latest: dict) -> tuple[str, int]:
    """(encoder spec, augmented views) of the feature table: new shards must match it."""
    if not lake.has_table(FEATURES):
        raise UserError(f"no features in {lake.uri}: run jobs/embed.py and jobs/train.py first")
    row = read_sample(lake, FEATURES, ["encoder", "views"], 1)
    encoder, views = row.column("encoder")[0].as_py(), len(row.column("views")[0])
    trained_on = (lake.read_json(latest["checkpoint"], CONFIG_FILE) or {}).get("encoder")
    if trained_on not in (None, encoder):
        raise UserError(f"LATEST model {latest['model_version']} was trained on {trained_on} features but "
                        f"the feature table holds {encoder} features: retrain before refreshing")
    return encoder, views


def chunks(shards: list[SourceShard], size: int) -> list[list[SourceShard]]:
    return [shards[i:i + size] for i in range(0, len(shards), size)]


def process_group(lake: Lake, group: list[SourceShard], encoder: str, views: int,
                  settings: RefreshSettings) -> tuple[dict[str, dict], int]:
    """Embed and label one group; returns its manifest entries and the samples labelled."""
    embedded = embed_uris([s.uri for s in group], lake, encoder, views, settings.batch_size)
    with_samples = [s.name for s in group if embedded.samples_by_shard[s.name] > 0]
    without = [s.name for s in group if embedded.samples_by_shard[s.name] == 0]
    model_version, labelled = latest_model(lake)["model_version"], 0
    if with_samples:
        inferred = infer(lake.uri, settings.infer_batch_size, shards=with_samples, evaluate=False)
        model_version, labelled = inferred.model_version, inferred.rows
    if without:
        Write(lake).commit(without, [LABELS])  # no good samples now: no labels either
    entries = {s.name: manifest_entry(s, embedded.samples_by_shard[s.name], embedded.bad_by_shard[s.name],
                                      encoder, model_version) for s in group}
    return entries, labelled


def refresh(settings: RefreshSettings) -> RefreshReport:
    """Process the new and changed shards of ``settings.shards`` into ``settings.lake``."""
    started = time.time()
    source = list_source(settings.shards)
    lake = Lake.open(settings.lake)
    latest = latest_model(lake)
    with LakeLock(lake, "refresh", settings.lock_ttl_s) as lock:
        if lock.took_over:
            print(f"took over the stale lock of {lock.took_over.describe()}", flush=True)
        report = refresh_locked(lake, lock, source, latest, settings)
    report.seconds = time.time() - started
    return report


def refresh_locked(lake: Lake, lock: LakeLock, source: list[SourceShard], latest: dict,
                   settings: RefreshSettings) -> RefreshReport:
    lake.discard_staging()
    manifest = read_manifest(lake)
    plan = plan_refresh(source, manifest)
    report = RefreshReport(latest["model_version"], len(source), len(plan.new), len(plan.changed),
                           len(plan.unchanged), len(plan.gone))
    print(f"refresh {lake.uri}: {len(source)} shards, {len(plan.todo)} to process "
          f"({report.new} new, {report.changed} changed)", flush=True)
    done = process_groups(lake, lock, plan.todo, latest, manifest, report, settings) if plan.todo else []
    report.model_version = latest_model(lake)["model_version"]
    report.drift = drift_of(lake, done, settings)
    return report


def process_groups(lake: Lake, lock: LakeLock, todo: list[SourceShard], latest: dict, manifest: dict[str, dict],
                   report: RefreshReport, settings: RefreshSettings) -> list[str]:
    """Process ``todo`` group by group, recording each finished group in the manifest; returns its shards."""
    encoder, views = feature_settings(lake, latest)
    done: list[str] = []
    for group in chunks(todo, settings.group_size):
        lock.check()
        try:
            entries, labelled = process_group(lake, group, encoder, views, settings)
        except UserError:
            raise
        except Exception as exn:  # a shard we cannot read must not stop the others
            reason = f"{type(exn).__name__}: {exn}".splitlines()[0]
            print(f"failed: {', '.join(s.name for s in group)}: {reason}", flush=True)
            report.failures.update({s.name: reason for s in group})
            continue
        lock.check()
        manifest.update(entries)
        write_manifest(lake, manifest)
        done += list(entries)
        report.samples += labelled
        report.bad_samples += sum(e["bad_samples"] for e in entries.values())
    return done


def drift_of(lake: Lake, shards: list[str], settings: RefreshSettings) -> Drift:
    latest = latest_model(lake)
    new = label_stats(lake, latest["model_version"], latest["clusters"], shards) if shards else None
    reference = baseline(lake, latest, shards) if new else None
    return Drift(reference, new, settings.max_confidence_drop, settings.max_cluster_shift)
