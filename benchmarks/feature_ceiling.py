"""How far the CIFAR-10 benchmark's features can take a clustering: supervised probes and k-means.

On ``shared/data/cifar10-test-effnetlite0.npz`` (10,000 clean EfficientNet-Lite0 features): a
logistic regression trained on 5,000 labelled images and scored on the other 5,000; a 1-nearest-
neighbour classifier (cosine, leave-one-out, every other label known); the share of each row's k
nearest rows that share its class (the positives a neighbour-based recipe learns from); k-means on
the raw, unit-length and PCA-whitened features. Labels enter only here: these are references for
the unsupervised models in BENCHMARKS.md, not a recipe.

    python benchmarks/feature_ceiling.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_FEATURES, REPO, header, table  # noqa: E402

sys.path.insert(0, str(REPO))

from rayclust.evaluation import cluster_metrics  # noqa: E402

NEIGHBOURS = (1, 5, 20, 50)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def nearest_rows(features: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(features)
    return index.search(features, k + 1)[1][:, 1:]  # the first found is the row itself


def main() -> None:
    if not CIFAR_FEATURES.is_file():
        raise SystemExit(f"missing {CIFAR_FEATURES}: the benchmark needs shared/data")
    header("What the CIFAR-10 benchmark's EfficientNet-Lite0 features allow (labels used: references only)")
    data = np.load(CIFAR_FEATURES)
    raw, truth = data["clean"].astype(np.float32), data["labels"].astype(int)
    features = unit(raw)
    rows = []
    half = len(truth) // 2
    probe = LogisticRegression(max_iter=300).fit(features[:half], truth[:half])
    rows.append({"reference": "logistic regression, 5,000 labelled -> the other 5,000", "accuracy":
                 f"{probe.score(features[half:], truth[half:]):.3f}"})
    found = nearest_rows(features, max(NEIGHBOURS))
    for k in NEIGHBOURS:
        share = (truth[found[:, :k]] == truth[:, None]).mean()
        what = "1-NN classifier, leave-one-out" if k == 1 else f"share of the {k} nearest rows in the row's class"
        rows.append({"reference": what, "accuracy": f"{share:.3f}"})
    for name, space in [("raw", raw), ("unit", features),
                        ("PCA-whitened 64-d", unit(PCA(64, whiten=True, random_state=0).fit_transform(features)))]:
        assigned = KMeans(10, n_init=3, random_state=0).fit_predict(space)
        rows.append({"reference": f"k-means (K 10, 3 starts), {name}", "accuracy":
                     f"{cluster_metrics(truth, assigned)['acc']:.3f} (ACC)"})
    print(table(rows))


if __name__ == "__main__":
    main()
