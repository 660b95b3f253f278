"""Is new data like the data the model was trained on? Compare label statistics.

Two signals from the labels table, new shards against the baseline:
- mean confidence: a model that is less sure on new data has not seen its like;
- cluster-size distribution, as total variation distance (half the L1 distance of the
  cluster fractions: the share of samples that would have to change cluster to match).
Both read a bounded sample of shards (``SAMPLE_SHARDS``, drawn with a fixed seed), so a
10M-row lake costs what a small one does. The baseline is the LATEST model's labels outside the
shards being refreshed, computed once per model version and kept in
``LAKE/manifest/_drift_baseline.json``: run right after
``jobs/infer.py`` relabels everything (as after every training), that is the training data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayclust.lake import MANIFEST, Lake

BASELINE_FILE = "_drift_baseline.json"  # "_": Spark skips it when reading manifest/
MIN_SAMPLES = 100
SAMPLE_SHARDS = 200


@dataclass
class LabelStats:
    model_version: str
    samples: int
    mean_confidence: float
    cluster_fractions: list[float]


def label_stats(lake: Lake, files: dict[str, str], model_version: str, clusters: int, shards: list[str],
                exclude: bool = False) -> LabelStats | None:
    """Statistics of ``model_version``'s labels in ``shards`` (or, with ``exclude``, all but those),
    from at most SAMPLE_SHARDS of them; ``files`` are the label files, shard -> path."""
    chosen = set(shards)
    names = sorted(set(files) - chosen) if exclude else sorted(chosen & set(files))
    names = random.Random(0).sample(names, min(len(names), SAMPLE_SHARDS))
    pieces = [pq.read_table(files[name], columns=["cluster", "confidence", "model_version"],
                            filesystem=lake.arrow_fs) for name in names]
    rows = pa.concat_tables(pieces) if pieces else None
    if rows is not None:
        rows = rows.filter(pc.equal(rows.column("model_version"), model_version))
    if rows is None or rows.num_rows == 0:
        return None
    sizes = np.bincount(rows.column("cluster").to_numpy(), minlength=clusters)
    return LabelStats(model_version, rows.num_rows, float(pc.mean(rows.column("confidence")).as_py()),
                      (sizes / sizes.sum()).round(6).tolist())


def baseline(lake: Lake, files: dict[str, str], latest: dict, new_shards: list[str]) -> LabelStats | None:
    """The model's label statistics outside ``new_shards`` (label files: shard -> path), cached
    per model version."""
    cached = lake.read_json(MANIFEST, BASELINE_FILE)
    if cached and cached["model_version"] == latest["model_version"]:
        return LabelStats(**cached)
    stats = label_stats(lake, files, latest["model_version"], latest["clusters"], new_shards, exclude=True)
    if stats is not None:
        lake.write_json(asdict(stats), MANIFEST, BASELINE_FILE)
    return stats


@dataclass
class Drift:
    baseline: LabelStats | None
    new: LabelStats | None
    max_confidence_drop: float
    max_cluster_shift: float

    @property
    def confidence_drop(self) -> float:
        return self.baseline.mean_confidence - self.new.mean_confidence

    @property
    def cluster_shift(self) -> float:
        return 0.5 * float(np.abs(np.subtract(self.baseline.cluster_fractions, self.new.cluster_fractions)).sum())

    @property
    def judged(self) -> bool:
        return self.baseline is not None and self.new is not None and self.new.samples >= MIN_SAMPLES

    @property
    def detected(self) -> bool:
        return self.judged and (self.confidence_drop > self.max_confidence_drop
                                or self.cluster_shift > self.max_cluster_shift)

    def __str__(self) -> str:
        if self.new is None:
            return "drift: nothing new was labelled"
        if self.baseline is None:
            return ("drift: no baseline (no labels of this model outside the new shards; "
                    "run jobs/infer.py after training)")
        if not self.judged:
            return f"drift: only {self.new.samples} new samples, fewer than {MIN_SAMPLES}: not judged"
        verdict = "DRIFT DETECTED" if self.detected else "no drift"
        lines = [
            f"drift: {verdict} (new samples {self.new.samples} vs {self.baseline.samples} of the baseline)",
            f"  mean confidence   {self.new.mean_confidence:.3f} vs {self.baseline.mean_confidence:.3f}: "
            f"drop {self.confidence_drop:+.3f} (limit {self.max_confidence_drop:.3f})",
            f"  cluster sizes     total variation {self.cluster_shift:.3f} (limit {self.max_cluster_shift:.3f})",
            "  cluster  " + " ".join(f"{c:>5}" for c in range(len(self.new.cluster_fractions))),
            "  baseline " + " ".join(f"{f:>5.1%}" for f in self.baseline.cluster_fractions),
            "  new      " + " ".join(f"{f:>5.1%}" for f in self.new.cluster_fractions),
        ]
        return "\n".join(lines)
