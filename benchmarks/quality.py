"""Clustering quality: k-means vs the CC-MLP baseline vs MFAVB with 1, 2 and 3 blocks.

On ``shared/data/cifar10-test-effnetlite0.npz`` (10,000 CIFAR-10 test images, ImageNet-
pretrained EfficientNet-Lite0 features: clean + 3 augmented views each), written as a feature
table in a local lake. Every model goes through the real path: ``training.train`` (Ray Train,
checkpoints, LATEST) then ``labels.infer`` (labels table); ACC/NMI/ARI are computed from the
written labels joined with the CIFAR labels on ``key``. One local Ray serves all runs. The
models use their shipped configs (``rayclust/model_configs/``), so the table measures the
defaults ``jobs/train.py`` ships; no run is selected by its accuracy.

    python benchmarks/quality.py                      # 3 seeds, all variants (about an hour on 2 cores)
    python benchmarks/quality.py --seeds 0 --variants ccmlp mfavb-2
    python benchmarks/quality.py --pyramid-epochs 8   # adds the pyramid model on the CIFAR-10 images
    python benchmarks/quality.py --seeds 0 --variants ccmlp-no-neighbours mfavb-2-pair-contrast   # ablations
    python benchmarks/quality.py --rows 500 --variants kmeans ccmlp      # a small corpus, default flags
    python benchmarks/quality.py --views 0 --variants ccmlp mfavb-2     # no augmented views: neighbours only
    python benchmarks/quality.py --features /tmp/digits-effnet.npz --variants kmeans ccmlp  # feature_sets.py

Goals (issue 3): MFAVB ACC >= k-means ACC + 0.15 (k-means: 0.462); MFAVB >= CC-MLP; one MFAVB
run <= 10 minutes on the 2-core machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_FEATURES, REPO, cifar_pattern, header, table  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

sys.path.insert(0, str(REPO))

VARIANTS = {  # name -> (model, config overrides)
    "ccmlp": ("ccmlp", {}),
    "mfavb-1": ("mfavb", {"blocks": 1}),
    "mfavb-2": ("mfavb", {"blocks": 2}),
    "mfavb-3": ("mfavb", {"blocks": 3}),
    "temi": ("temi", {}),
}
ABLATIONS = {  # what each recipe choice of docs/models.md is worth
    "ccmlp-no-neighbours": ("ccmlp", {"neighbours": 0}),
    "mfavb-2-no-neighbours": ("mfavb", {"blocks": 2, "neighbours": 0}),
    "mfavb-2-pair-contrast": ("mfavb", {"blocks": 2, "contrast": "pair"}),
    "mfavb-2-10-epochs": ("mfavb", {"blocks": 2, "epochs": 10}),
    "mfavb-2-lr-1e-3": ("mfavb", {"blocks": 2, "lr": 1e-3}),
    "mfavb-2-lr-1e-4": ("mfavb", {"blocks": 2, "lr": 1e-4}),
    "mfavb-2-one-token": ("mfavb", {"blocks": 2, "tokens": 1}),
    "mfavb-2-width-256": ("mfavb", {"blocks": 2, "width": 256}),
    "mfavb-2-no-layer-scale": ("mfavb", {"blocks": 2, "layer_scale": None}),
    "temi-mfavb": ("temi-mfavb", {}),  # TEMI's loss on MFAVB's blocks: about 30 minutes a seed
    "ccmlp-no-self-label": ("ccmlp", {"self_label_epochs": 0}),
    "mfavb-2-no-self-label": ("mfavb", {"blocks": 2, "self_label_epochs": 0}),
    "ccmlp-one-cluster-head": ("ccmlp", {"cluster_heads": 1}),
    "ccmlp-demo-flags": ("ccmlp", {"epochs": 30, "batch_size": 128}),  # what rayclust/demo.py passed until 2026-12-01
    "ccmlp-no-step-floor": ("ccmlp", {"min_steps": 0}),  # the shipped epochs however small the table
    "mfavb-2-no-step-floor": ("mfavb", {"blocks": 2, "min_steps": 0}),
    "mfavb-2-one-cluster-head": ("mfavb", {"blocks": 2, "cluster_heads": 1}),
    "temi-no-step-floor": ("temi", {"min_steps": 0}),
}
ROWS_PER_SHARD = 1000


def build_lake(lake_uri: str, features: Path = CIFAR_FEATURES, rows: int | None = None, views: int = 3
               ) -> tuple[dict[str, int], np.ndarray]:
    """The ``features`` npz (or a random ``rows`` of it, the same for every seed) as a feature table of 1,000-row
    shards with the first ``views`` augmented views (as ``jobs/embed.py --views``); returns key ->
    true label, and the clean features."""
    import numpy as np

    from rayclust.features import write_feature_arrays
    from rayclust.lake import Lake

    data = dict(np.load(features))
    encoder = str(data.pop("encoder", "effnet-lite0"))  # infer names clusters with an encoder it knows
    data["views"] = data["views"][:, :views]
    if rows:
        chosen = np.sort(np.random.default_rng(0).permutation(len(data["keys"]))[:rows])
        data = {name: values[chosen] for name, values in data.items()}
    lake = Lake.open(lake_uri)
    for start in range(0, len(data["keys"]), ROWS_PER_SHARD):
        part = slice(start, start + ROWS_PER_SHARD)
        write_feature_arrays(lake, f"{features.stem}-{start // ROWS_PER_SHARD:02d}", data["keys"][part],
                             data["labels"][part], data["clean"][part], data["views"][part], encoder)
    return dict(zip(data["keys"].tolist(), data["labels"].tolist())), data["clean"].astype(np.float32)


def label_quality(lake_uri: str, truth: dict[str, int]) -> dict[str, float]:
    """ACC/NMI/ARI of the labels table the infer stage wrote, against the true labels."""
    import numpy as np
    import pyarrow.dataset as pads

    from rayclust.evaluation import cluster_metrics
    from rayclust.lake import LABELS, Lake

    lake = Lake.open(lake_uri)
    labels = pads.dataset(lake.path(LABELS), filesystem=lake.arrow_fs, partitioning="hive")
    table_ = labels.to_table(columns=["key", "cluster", "confidence"])
    keys = table_.column("key").to_pylist()
    if len(keys) != len(truth) or len(set(keys)) != len(keys):
        raise SystemExit(f"labels table has {len(keys)} rows ({len(set(keys))} keys), expected {len(truth)}")
    metrics = cluster_metrics(np.array([truth[k] for k in keys]), table_.column("cluster").to_numpy())
    return {**metrics, "confidence": float(np.mean(table_.column("confidence").to_numpy()))}


def run_variant(lake_uri: str, name: str, seed: int, epochs: int | None, truth: dict[str, int],
                clusters: int) -> dict:
    from rayclust.labels import infer
    from rayclust.training import TrainSettings, train

    model, overrides = {**VARIANTS, **ABLATIONS}[name]
    started = time.perf_counter()
    latest = train(TrainSettings(lake_uri, model, clusters=clusters, epochs=epochs, run=f"{name}-seed{seed}", seed=seed,
                                 overrides=overrides, evaluate=False))
    trained = time.perf_counter()
    infer(lake_uri, evaluate=False)
    return {**label_quality(lake_uri, truth), "train_s": trained - started,
            "infer_s": time.perf_counter() - trained, "loss": latest["metrics"]["loss"],
            "refilled": latest["metrics"].get("refilled_clusters", 0)}


def kmeans_row(clean, truth_labels, seed: int, clusters: int) -> dict:
    from rayclust.evaluation import cluster_metrics, kmeans_labels

    started = time.perf_counter()
    metrics = cluster_metrics(truth_labels, kmeans_labels(clean, clusters, seed=seed))
    return {**metrics, "train_s": time.perf_counter() - started, "infer_s": 0.0}


def summarise(name: str, runs: list[dict]) -> dict:
    def spread(key: str) -> str:
        values = [r[key] for r in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {std:.3f}"

    return {"method": name, "ACC": spread("acc"), "NMI": spread("nmi"), "ARI": spread("ari"),
            "seeds": len(runs), "train s (mean)": f"{statistics.mean(r['train_s'] for r in runs):.0f}",
            "infer s (mean)": f"{statistics.mean(r['infer_s'] for r in runs):.0f}"}


def pyramid_rows(seeds: list[int], epochs: int) -> list[dict]:
    from _pyramid import pyramid_quality

    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="rayclust-pyramid-") as lake:
            run = pyramid_quality(cifar_pattern(10), lake, epochs, seed)
        runs.append({**run, "train_s": run["seconds"], "infer_s": run["infer_seconds"]})
        print(f"pyramid seed {seed}: {run}", flush=True)
    return [summarise(f"pyramid (images, {epochs} epochs)", runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["kmeans", *VARIANTS],
                        choices=["kmeans", *VARIANTS, *ABLATIONS])
    parser.add_argument("--epochs", type=int, default=None, help="override every model's shipped epochs")
    parser.add_argument("--rows", type=int, default=None,
                        help="a random subset of this many images (a small corpus; default: all 10,000)")
    parser.add_argument("--views", type=int, default=3, choices=[0, 1, 2, 3],
                        help="augmented views per image in the table (0: clean embeddings and neighbours only)")
    parser.add_argument("--features", type=Path, default=CIFAR_FEATURES,
                        help="an npz of keys, labels, clean [N, D], views [N, V, D] and optionally the encoder's "
                             "name (default: CIFAR-10's; "
                             "others: feature_sets.py); K is its number of classes")
    parser.add_argument("--pyramid-epochs", type=int, default=0, help="also train the pyramid model (0: skip)")
    args = parser.parse_args()
    if not args.features.is_file():
        raise SystemExit(f"missing {args.features}: the CIFAR-10 features are in shared/data")
    header(f"Clustering quality on {args.features.name}, through train + infer")

    import numpy as np

    from rayclust.runtime import init_ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="rayclust-quality-") as lake:
        truth, clean = build_lake(lake, args.features, args.rows, args.views)
        truth_labels = np.array(list(truth.values()))
        clusters = len(np.unique(truth_labels))
        init_ray()
        for name in args.variants:
            runs = []
            for seed in args.seeds:
                run = kmeans_row(clean, truth_labels, seed, clusters) if name == "kmeans" else \
                    run_variant(lake, name, seed, args.epochs, truth, clusters)
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.items()), flush=True)
                runs.append(run)
            rows.append(summarise(name, runs))
            print(table(rows), flush=True)
    if args.pyramid_epochs:
        rows += pyramid_rows(args.seeds, args.pyramid_epochs)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
