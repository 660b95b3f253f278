"""Labelled feature sets other than CIFAR-10, as npz files for ``quality.py --features``: the
check that a recipe's gain over k-means holds on data its choices were not measured on (issue 13).

Each file holds ``keys``, ``labels``, ``clean`` [N, D] and ``views`` [N, V, D], as the CIFAR-10 one, and
the ``encoder`` that made them (the infer job names clusters with an encoder it knows, numbers them otherwise).

    python benchmarks/feature_sets.py --lake demo-lake/lake --out /tmp/digits-effnet.npz   # after `make demo`
    python benchmarks/feature_sets.py --digits-pixels --out /tmp/digits-pixels.npz

``--lake``: a lake's feature table with its ``label`` column (the demo's: 1,797 scikit-learn
digits drawn as images, EfficientNet-Lite0 features, 2 augmented views). ``--digits-pixels``: the
same digits' 64 raw pixel values, no views (a feature model then trains on neighbours alone).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def lake_features(lake_uri: str) -> dict[str, np.ndarray]:
    """The feature table's labelled rows (``label`` >= 0), ordered by key."""
    import pyarrow.dataset as pads

    from rayclust.lake import FEATURES, Lake, list_to_numpy

    lake = Lake.open(lake_uri)
    table = pads.dataset(lake.path(FEATURES), filesystem=lake.arrow_fs, partitioning="hive").to_table(
        columns=["key", "label", "embedding", "views", "encoder"], filter=pads.field("label") >= 0).sort_by("key")
    if table.num_rows == 0:
        raise SystemExit(f"no labelled rows in the feature table of {lake_uri}")
    dim, views = len(table.column("embedding")[0]), len(table.column("views")[0])
    return {"keys": np.array(table.column("key").to_pylist()),
            "labels": table.column("label").to_numpy().astype(np.int16),
            "clean": list_to_numpy(table.column("embedding"), dim).astype(np.float16),
            "views": list_to_numpy(table.column("views"), views, dim).astype(np.float16),
            "encoder": np.array(table.column("encoder")[0].as_py())}


def digits_pixels() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.data.astype(np.float16)
    return {"keys": np.array([f"digit-{i:05d}" for i in range(len(pixels))]),
            "labels": digits.target.astype(np.int16), "clean": pixels,
            "views": np.zeros((len(pixels), 0, pixels.shape[1]), np.float16), "encoder": np.array("digit-pixels")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--lake", help="a lake whose feature table has labels")
    source.add_argument("--digits-pixels", action="store_true", help="scikit-learn's digits, raw pixels")
    parser.add_argument("--out", required=True, help="the npz to write")
    args = parser.parse_args()
    arrays = lake_features(args.lake) if args.lake else digits_pixels()
    np.savez(args.out, **arrays)
    print(f"{args.out}: {len(arrays['keys']):,} rows, {arrays['clean'].shape[1]}-d, "
          f"{arrays['views'].shape[1]} views, {len(np.unique(arrays['labels']))} classes")


if __name__ == "__main__":
    main()
