"""Clustering quality against ground-truth labels: ACC (Hungarian matching), NMI, ARI."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, confusion_matrix, normalized_mutual_info_score
from sklearn.preprocessing import normalize


def cluster_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Accuracy under the best one-to-one mapping of clusters to classes."""
    counts = confusion_matrix(truth, predicted)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(truth))


def cluster_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    return {
        "acc": cluster_accuracy(truth, predicted),
        "nmi": float(normalized_mutual_info_score(truth, predicted)),
        "ari": float(adjusted_rand_score(truth, predicted)),
    }


def kmeans_labels(features: np.ndarray, clusters: int, seed: int = 0) -> np.ndarray:
    """scikit-learn k-means (n_init=10) on L2-normalised features: the baseline to beat."""
    return KMeans(clusters, n_init=10, random_state=seed).fit_predict(normalize(features))


def quality_table(rows: dict[str, dict[str, float]], samples: int) -> str:
    lines = [f"clustering quality on {samples} labelled samples", f"{'method':<28}{'ACC':>8}{'NMI':>8}{'ARI':>8}"]
    for name, m in rows.items():
        lines.append(f"{name:<28}{m['acc']:>8.3f}{m['nmi']:>8.3f}{m['ari']:>8.3f}")
    return "\n".join(lines)


def compare_with_kmeans(name: str, truth: np.ndarray, predicted: np.ndarray, clean: np.ndarray,
                        clusters: int) -> str:
    """The quality table of a model's clusters beside k-means on the same clean features."""
    rows = {
        name: cluster_metrics(truth, predicted),
        "k-means (clean features)": cluster_metrics(truth, kmeans_labels(clean, clusters)),
    }
    return quality_table(rows, len(truth))
