"""Choosing K without labels (rayclust.choose_k, ``jobs/train.py --clusters auto``) on data of known K.

The chooser runs on the clean features as the train job runs it on a feature table's first 20,000
rows, over the ``auto`` range (2..50) unless ``--range A:B``:

- digits: scikit-learn's 1,797 digits, pixels scaled to [0, 1] (the tests' feature table), 10 classes;
- blobs-25: scikit-learn ``make_blobs``, 10,000 rows, 25 isotropic components in 256 dimensions;
- grouped-25: ``train_scale.mixture``, 10,000 rows, 25 anisotropic components of unequal sizes in
  two groups of close components (a two-level structure);
- cifar10: ``shared/data/cifar10-test-effnetlite0.npz``, the 10,000 CIFAR-10 test images'
  EfficientNet-Lite0 features, 10 classes.

The labels are only reported: the chooser never sees them. Prints one table of choices (true K,
K chosen, K of the best mean, wall and CPU seconds: the CPU time says what it costs on a machine
that others share) and one of the criterion per K tried (mean ± standard error).

    python benchmarks/choose_k.py
    python benchmarks/choose_k.py --datasets digits cifar10 --range 2:30
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_FEATURES, REPO, header, table  # noqa: E402

sys.path.insert(0, str(REPO))

MIXTURE_ROWS = 10_000
MIXTURE_K = 25


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data / 16.0, 10


def blobs():
    from sklearn.datasets import make_blobs

    clean, _ = make_blobs(n_samples=MIXTURE_ROWS, centers=MIXTURE_K, n_features=256, cluster_std=2.0,
                          center_box=(-2, 2), random_state=0)
    return clean, MIXTURE_K


def grouped():
    from train_scale import mixture

    clean, _, _ = mixture(MIXTURE_ROWS, MIXTURE_K)
    return clean, MIXTURE_K


def cifar10():
    import numpy as np

    if not CIFAR_FEATURES.is_file():
        raise SystemExit(f"missing {CIFAR_FEATURES}: the cifar10 row needs shared/data")
    return np.load(CIFAR_FEATURES)["clean"], 10


DATASETS = {"digits": digits, "blobs-25": blobs, "grouped-25": grouped, "cifar10": cifar10}


def main() -> None:
    from rayclust.cli import AUTO_CLUSTERS, cluster_count

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--range", type=cluster_count, default=AUTO_CLUSTERS, help="A:B (default: auto)")
    args = parser.parse_args()
    header("Choosing K without labels: silhouette of k-means, one-standard-error rule")

    from rayclust.choose_k import choose_clusters

    choices, per_k = [], {}
    for name in args.datasets:
        clean, true_k = DATASETS[name]()
        started, cpu = time.perf_counter(), time.process_time()
        choice = choose_clusters(clean, args.range, report=lambda line, name=name: print(f"{name}: {line}", flush=True))
        choices.append({"dataset": name, "rows": len(clean), "dim": clean.shape[1], "true K": true_k,
                        "K chosen": choice.chosen, "best mean at K": choice.best,
                        "seconds": f"{time.perf_counter() - started:.0f}",
                        "CPU seconds": f"{time.process_time() - cpu:.0f}"})
        for score in choice.scores:
            per_k.setdefault(score.clusters, {"K": score.clusters})[name] = f"{score.score:.3f} ± {score.error:.3f}"
        print(table(choices), flush=True)
    print()
    print(table(choices))
    print()
    print(table([per_k[k] for k in sorted(per_k)], ["K", *args.datasets]))


if __name__ == "__main__":
    main()
