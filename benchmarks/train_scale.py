"""Train scale: training on a synthetic feature table with known truth at 100,000 and 1,000,000 rows.

The table is a mixture of Gaussians in 256 dimensions (``mixture``): K components in K/10
groups (components of a group lie close, so they overlap), unequal sizes (Dirichlet weights),
per-component per-dimension scales (anisotropic); each row's augmented views are noisy copies
of it. It is written to a local lake as the embed job lays it out (10,000-row shards), then:

1. ``jobs/train.py --model ccmlp --clusters K --epochs E --self-label-epochs 0`` (1 worker),
   timed with its process tree's peak RSS; its output gives the neighbour search (mined or
   read, method, seconds) and samples/s per epoch;
2. ``jobs/infer.py`` labels every row;
3. the labels are read back: empty clusters, ACC/NMI against the truth over every row, beside
   scikit-learn ``MiniBatchKMeans`` (K clusters, 1 start, at most 20 passes) on the same clean
   (L2-normalised) features.

Goals (issue 11): samples/s at 1M rows >= 0.8 x at 100k; peak RSS grows less than the table;
ACC >= k-means; at most 5 % of the clusters empty at K = 1,000.

    python benchmarks/train_scale.py                                    # 100k and 1M rows, K = 100 and 1,000
    python benchmarks/train_scale.py --rows 100000 --clusters 100 --epochs 1
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, REPO, epoch_lines, header, mib, run_monitored, table  # noqa: E402

sys.path.insert(0, str(REPO))

DIM = 256
VIEWS = 2
SHARD_ROWS = 10_000
NEIGHBOURS_LINE = re.compile(r"neighbours: (\d+) per row of ([\d,]+) rows (mined|read from the lake)[^:]*: (.+), "
                             r"([\d.]+)s")


def mixture(rows: int, clusters: int, seed: int = 0):
    """(clean [rows, DIM], views [rows, VIEWS, DIM], truth [rows]) of a Gaussian mixture."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = max(1, clusters // 10)
    centres = rng.normal(0, 1, (groups, DIM))[rng.integers(groups, size=clusters)]
    means = centres + rng.normal(0, 0.35, (clusters, DIM))
    scales = 0.3 * rng.lognormal(0, 0.5, (clusters, DIM))
    truth = rng.choice(clusters, size=rows, p=rng.dirichlet(np.full(clusters, 2.0)))
    clean = (means[truth] + scales[truth] * rng.normal(size=(rows, DIM))).astype(np.float32)
    views = clean[:, None] + (0.1 * scales[truth])[:, None] * rng.normal(size=(rows, VIEWS, DIM))
    return clean, views.astype(np.float32), truth


def write_table(lake_path: Path, rows: int, clusters: int) -> float:
    """The mixture as a feature table of SHARD_ROWS-row shards; returns its Parquet bytes."""
    import numpy as np

    from rayclust.features import write_feature_arrays
    from rayclust.lake import Lake

    lake = Lake.open(str(lake_path), create=True)
    clean, views, truth = mixture(rows, clusters)
    for shard, start in enumerate(range(0, rows, SHARD_ROWS)):
        part = slice(start, start + SHARD_ROWS)
        keys = np.array([f"row-{i:08d}" for i in range(start, min(rows, start + SHARD_ROWS))])
        write_feature_arrays(lake, f"mix-{shard:05d}", keys, truth[part], clean[part], views[part], "mixture")
    return sum(f.stat().st_size for f in lake_path.glob("features/*/*.parquet"))


def kmeans_baseline(lake_path: Path, clusters: int) -> dict:
    import numpy as np
    import pyarrow.dataset as pads
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.preprocessing import normalize

    from rayclust.evaluation import cluster_metrics
    from rayclust.lake import list_to_numpy

    features = pads.dataset(lake_path / "features", partitioning="hive").to_table(columns=["embedding", "label"])
    started = time.perf_counter()
    predicted = MiniBatchKMeans(clusters, n_init=1, max_iter=20, batch_size=4096, random_state=0).fit_predict(
        normalize(list_to_numpy(features.column("embedding"), DIM)))
    metrics = cluster_metrics(features.column("label").to_numpy(), predicted)
    return {**metrics, "seconds": time.perf_counter() - started, "empty": clusters - len(np.unique(predicted))}


def label_quality(lake_path: Path, clusters: int) -> dict:
    import numpy as np
    import pyarrow.dataset as pads

    from rayclust.evaluation import cluster_metrics

    truth = pads.dataset(lake_path / "features", partitioning="hive").to_table(columns=["key", "label"])
    labels = pads.dataset(lake_path / "labels", partitioning="hive").to_table(columns=["key", "cluster"])
    joined = truth.join(labels, "key")
    predicted = joined.column("cluster").to_numpy()
    return {**cluster_metrics(joined.column("label").to_numpy(), predicted), "rows": joined.num_rows,
            "empty": clusters - len(np.unique(predicted))}


def run(args, rows: int, clusters: int, root: Path) -> dict:
    lake = root / f"lake-{rows}-{clusters}"
    started = time.perf_counter()
    table_bytes = write_table(lake, rows, clusters)
    print(f"  table: {rows:,} rows, {mib(table_bytes):.0f} MiB of Parquet, written in "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    trained = run_monitored([PYTHON, "jobs/train.py", "--lake", str(lake), "--model", args.model,
                             "--clusters", str(clusters), "--epochs", str(args.epochs), "--self-label-epochs", "0",
                             *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
                             "--workers", "1", "--run", "scale"],
                            interval=1.0, echo=args.echo)
    mined = NEIGHBOURS_LINE.search(trained.output)
    rates = [e.samples_per_second for e in epoch_lines(trained.output)]
    inferred = run_monitored([PYTHON, "jobs/infer.py", "--lake", str(lake)], interval=1.0, echo=args.echo)
    quality, kmeans = label_quality(lake, clusters), kmeans_baseline(lake, clusters)
    return {"rows": rows, "K": clusters, "table MiB": mib(table_bytes),
            "mining": f"{mined.group(4)}, {float(mined.group(5)):.0f}s" if mined else "-",
            "samples/s per epoch": " ".join(f"{r:.0f}" for r in rates), "train wall s": trained.seconds,
            "train peak RSS MiB": mib(trained.memory.peak_rss), "train peak PSS MiB": mib(trained.memory.peak_pss),
            "infer wall s": inferred.seconds, "empty clusters": quality["empty"],
            "ACC": quality["acc"], "NMI": quality["nmi"], "k-means ACC": kmeans["acc"], "k-means NMI": kmeans["nmi"],
            "k-means empty": kmeans["empty"], "k-means s": kmeans["seconds"],
            "other cores": trained.memory.other_cores, "_rates": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--clusters", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--model", default="ccmlp", help="model config (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="contrastive epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="samples per step (default: the job's: the config's, at least 2 per cluster)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the lakes go (default: a temporary folder)")
    parser.add_argument("--echo", action="store_true", help="echo the jobs' output")
    args = parser.parse_args()

    header("Train scale: a Gaussian-mixture feature table at growing size")
    print(f"model {args.model}, {args.epochs} contrastive epochs, "
          f"batch {args.batch_size or 'the job default'}, 1 worker, "
          f"{DIM}-d features with {VIEWS} views\n", flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as root:
        results = []
        for clusters in args.clusters:
            for rows in args.rows:
                print(f"rows {rows:,}, K {clusters} ...", flush=True)
                results.append(run(args, rows, clusters, Path(root)))
                print("  " + ", ".join(f"{k} {v}" for k, v in results[-1].items() if not k.startswith("_")),
                      flush=True)
    print()
    print(table([{k: v for k, v in r.items() if not k.startswith("_")} for r in results]))
    print_goals(results)


def print_goals(results: list[dict]) -> None:
    print("\n## goals\n")
    for clusters in sorted({r["K"] for r in results}):
        runs = sorted((r for r in results if r["K"] == clusters), key=lambda r: r["rows"])
        small, large = runs[0], runs[-1]
        rate = lambda r: sum(r["_rates"][1:] or r["_rates"]) / len(r["_rates"][1:] or r["_rates"])  # noqa: E731
        if large is not small:
            ratio = rate(large) / rate(small)
            print(f"- K={clusters}: samples/s at {large['rows']:,} / at {small['rows']:,} rows = {ratio:.2f} "
                  f"(goal >= 0.8): {'MET' if ratio >= 0.8 else 'MISSED'}")
            growth = large["train peak RSS MiB"] / small["train peak RSS MiB"]
            table_growth = large["table MiB"] / small["table MiB"]
            print(f"- K={clusters}: peak RSS grew {growth:.2f} x while the table grew {table_growth:.1f} x: "
                  f"{'MET' if growth < table_growth else 'MISSED'}")
        for r in runs:
            print(f"- K={clusters}, {r['rows']:,} rows: ACC {r['ACC']:.3f} vs k-means {r['k-means ACC']:.3f}: "
                  f"{'MET' if r['ACC'] >= r['k-means ACC'] else 'MISSED'}; empty clusters {r['empty clusters']} "
                  f"({r['empty clusters'] / clusters:.1%}, goal <= 5%): "
                  f"{'MET' if r['empty clusters'] <= 0.05 * clusters else 'MISSED'}")


if __name__ == "__main__":
    main()
