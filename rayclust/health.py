"""Label-free health of a clustering: cluster sizes, empty clusters, mean confidence, and a warning
when the clusters collapsed (no ground truth needed, so it is printed for every corpus).

Collapse, as this module judges it: some cluster is empty, or one cluster holds more than
DOMINANT_SHARE of the rows and more than DOMINANT_FAIR_SHARES times its fair share 1/K (with
K = 2 one cluster always holds half, so only empty clusters count there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from rayclust.lake import Lake

DOMINANT_SHARE = 0.5
DOMINANT_FAIR_SHARES = 2.0


@dataclass(frozen=True)
class ClusterHealth:
    """Rows per cluster (``sizes[k]``: cluster k's rows) and their mean confidence, over ``scope``
    (what was counted: a sample, or every label)."""

    sizes: tuple[int, ...]
    mean_confidence: float
    scope: str

    @property
    def rows(self) -> int:
        return sum(self.sizes)

    @property
    def empty(self) -> int:
        return self.sizes.count(0)

    @property
    def dominant_share(self) -> float:
        return max(self.sizes) / self.rows if self.rows else 0.0

    @property
    def dominated(self) -> bool:
        return self.dominant_share > max(DOMINANT_SHARE, DOMINANT_FAIR_SHARES / len(self.sizes))

    @property
    def warning(self) -> str | None:
        problems = []
        if self.empty:
            problems.append(f"{self.empty} of {len(self.sizes)} clusters are empty")
        if self.dominated:
            problems.append(f"cluster {self.sizes.index(max(self.sizes))} holds {self.dominant_share:.0%} of the rows")
        if not problems:
            return None
        return (f"warning: the clusters collapsed: {' and '.join(problems)}; train again with fewer --clusters, "
                f"more --epochs or another --model")

    def __str__(self) -> str:
        line = (f"cluster health on {self.scope} ({self.rows:,} rows, {len(self.sizes)} clusters): sizes smallest "
                f"{min(self.sizes):,}, median {int(np.median(self.sizes)):,}, largest {max(self.sizes):,}; "
                f"{self.empty} empty; mean confidence {self.mean_confidence:.3f}")
        return "\n".join(filter(None, [line, self.warning]))


def health_of(clusters: np.ndarray, confidence: np.ndarray, k: int, scope: str) -> ClusterHealth:
    """From each row's cluster and confidence (arrays of equal length)."""
    mean = float(np.mean(confidence)) if len(confidence) else 0.0
    return ClusterHealth(tuple(np.bincount(clusters, minlength=k).tolist()), mean, scope)


def label_health(lake: Lake, label_files: dict[str, str], k: int) -> ClusterHealth:
    """Over every label row of the files (shard -> path), reading only their ``cluster`` and
    ``confidence`` columns a batch at a time: the driver holds K counts and a sum, whatever the
    number of rows."""
    sizes, confidence = np.zeros(k, np.int64), 0.0
    columns = pa.schema([("cluster", pa.int32()), ("confidence", pa.float32())])  # also when there is no file
    labels = pads.dataset(list(label_files.values()), columns, format="parquet", filesystem=lake.arrow_fs)
    for batch in labels.to_batches(columns=columns.names):
        sizes += np.bincount(batch.column("cluster").to_numpy(), minlength=k)
        confidence += float(np.sum(batch.column("confidence").to_numpy(), dtype=np.float64))
    rows = int(sizes.sum())
    return ClusterHealth(tuple(sizes.tolist()), confidence / rows if rows else 0.0, "all labels")
