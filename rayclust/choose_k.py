"""K from the data: the number of clusters chosen without labels, on a bounded sample of clean embeddings.

The criterion is the silhouette of k-means (Rousseeuw 1987) on L2-normalised embeddings, in their
top principal directions: for each K tried, ``REPEATS`` random subsamples of at most
``SUBSAMPLE_ROWS`` rows are each clustered by k-means (a seed of their own) and scored; the score
is the mean silhouette and its standard error over the repeats. The chosen K is the smallest whose
mean is within one standard error of the best mean (the one-standard-error rule of model selection
by cross-validation, Breiman et al. 1984): a larger K has to earn its place by more than the noise. Why silhouette and
not subsample stability or the kNN graph's eigengap: docs/models.md ("Choosing K") and
BENCHMARKS.md ("Choosing K").
"""
from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import normalize

from rayclust.cli import ClusterRange
from rayclust.errors import UserError

CRITERION = "silhouette (k-means, L2-normalised, one-standard-error rule)"
CHOICE_ROWS = 20_000  # the train job reads at most this many rows of the feature table to choose K
SUBSAMPLE_ROWS = 3_000  # each repeat clusters and scores this many of them: silhouette costs rows squared
REPEATS = 3
KMEANS_STARTS = 3  # with one, a mixture of 12 blobs came out at 13: a start can merge two and split another
DIMENSIONS = 64  # principal directions kept: k-means and silhouette cost grows with the width
MIN_ROWS_PER_CLUSTER = 10  # a K whose subsample would give fewer rows per cluster is not tried


@dataclass(frozen=True)
class KScore:
    """The criterion for one K: the mean over the repeats, its standard error, and the time it took."""

    clusters: int
    score: float
    error: float
    seconds: float

    def __str__(self) -> str:
        return f"K {self.clusters}: silhouette {self.score:.4f} ± {self.error:.4f} ({self.seconds:.1f}s)"


@dataclass(frozen=True)
class KChoice:
    """What was tried, how, and the K chosen."""

    criterion: str
    chosen: int
    best: int  # the K with the highest mean; ``chosen`` is the smallest within one standard error of it
    rows: int
    scores: list[KScore]

    def __str__(self) -> str:
        return (f"chose K = {self.chosen} by {self.criterion} on {self.rows:,} rows "
                f"(best mean at K = {self.best}; {len(self.scores)} K tried in "
                f"{sum(s.seconds for s in self.scores):.0f}s)")

    def as_json(self) -> dict:
        return asdict(self)


def principal_directions(clean: np.ndarray, seed: int) -> np.ndarray:
    """The L2-normalised rows in their top DIMENSIONS principal directions (all of them if fewer)."""
    unit = normalize(clean.astype(np.float32))
    kept = min(DIMENSIONS, unit.shape[1], len(unit))
    return PCA(kept, svd_solver="randomized", random_state=seed).fit_transform(unit)


def score_clusters(reduced: np.ndarray, clusters: int, seed: int) -> KScore:
    """The silhouette of k-means with ``clusters`` clusters on REPEATS random subsamples of ``reduced``."""
    started = time.perf_counter()
    rng = np.random.default_rng([seed, clusters])
    silhouettes = []
    for repeat in range(REPEATS):
        rows = reduced[rng.permutation(len(reduced))[:SUBSAMPLE_ROWS]]
        labels = KMeans(clusters, n_init=KMEANS_STARTS, random_state=seed * REPEATS + repeat).fit_predict(rows)
        silhouettes.append(silhouette_score(rows, labels))
    return KScore(clusters, float(np.mean(silhouettes)), float(np.std(silhouettes, ddof=1) / np.sqrt(REPEATS)),
                  time.perf_counter() - started)


def clusters_to_try(tried: ClusterRange, rows: int) -> range:
    """The range, without the K too large for a subsample of ``rows`` rows."""
    largest = min(tried.last, min(rows, SUBSAMPLE_ROWS) // MIN_ROWS_PER_CLUSTER)
    if largest < tried.first:
        raise UserError(f"{rows} rows are too few to choose K from {tried}: each K needs "
                        f"{MIN_ROWS_PER_CLUSTER} rows per cluster; give --clusters K")
    return range(tried.first, largest + 1)


def one_standard_error_choice(scores: list[KScore]) -> tuple[int, int]:
    """(chosen, best): the smallest K whose mean is within one standard error of the best mean."""
    best = max(scores, key=lambda s: s.score)
    chosen = next(s for s in scores if s.score >= best.score - best.error)
    return chosen.clusters, best.clusters


def choose_clusters(clean: np.ndarray, tried: ClusterRange, seed: int = 0,
                    report: Callable[[str], None] = functools.partial(print, flush=True)) -> KChoice:
    """The K of ``tried`` that the criterion picks on ``clean`` [rows, dim]; ``report`` gets one line per K."""
    ks = clusters_to_try(tried, len(clean))
    reduced = principal_directions(clean, seed)
    scores = []
    for clusters in ks:
        scores.append(score_clusters(reduced, clusters, seed))
        report(str(scores[-1]))
    chosen, best = one_standard_error_choice(scores)
    return KChoice(CRITERION, chosen, best, len(clean), scores)
