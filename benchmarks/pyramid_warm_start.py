"""The pretrained pyramid's warm start: k-means from random starts against Ward-seeded k-means
(issue 13: why ``pyramid-effnet-lite0``'s seeds differ, and what its warm start now does).

Runs the shipped config's pretrained stages (the heads are not used) over the clean images of the
CIFAR-10 test shards, takes the warm start's sample as the train job takes it
(``views.sample_of_images``) and clusters the last stage's L2-normalised pooled features of the
sample: single k-means starts, the lowest-inertia partition of ``--n-init`` starts for each of 3
seeds, and ``ward_seeded_kmeans`` (the shipped warm start). Each partition labels every image by
its nearest centre, as the head fitted to it does (within 0.01 ACC), scored against the labels.
Then the same on the 1,797 scikit-learn digits drawn as the demo draws them: data no choice was
made on.

    python benchmarks/pyramid_warm_start.py      # about 10 minutes here, most of it the backbone
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cifar_pattern, header, table  # noqa: E402

from rayclust.demo import write_digit_images  # noqa: E402
from rayclust.evaluation import cluster_accuracy  # noqa: E402
from rayclust.models import build_model, model_config  # noqa: E402
from rayclust.models.pyramid import ward_seeded_kmeans  # noqa: E402
from rayclust.shards import expand_shards  # noqa: E402
from rayclust.views import clean_view, sample_of_images  # noqa: E402

CLUSTERS = 10
SEEDS = 3


def last_stage(model, images: torch.Tensor) -> np.ndarray:
    """The last stage's pooled map of clean images, L2-normalised, as the warm start clusters it."""
    pooled = model.stage_features(images)[-1]
    return torch.nn.functional.normalize(pooled, dim=1).numpy().astype(np.float64)


def cifar_features(model, shards: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every test image's ``last_stage`` feature, and its label, in batches."""
    dataset = wds.WebDataset(expand_shards(cifar_pattern(shards)), shardshuffle=False).decode("pil")
    batches = dataset.to_tuple("jpg;png", "cls").map_tuple(clean_view(size), int).batched(250)
    features, truth = zip(*((last_stage(model, images), np.asarray(labels)) for images, labels in batches))
    return np.concatenate(features), np.concatenate(truth)


def digit_images(size: int) -> tuple[torch.Tensor, np.ndarray]:
    with tempfile.TemporaryDirectory() as folder:
        write_digit_images(Path(folder))
        paths = sorted(Path(folder).glob("*/*.png"))
        images = torch.stack([clean_view(size)(Image.open(p).convert("RGB")) for p in paths])
    return images, np.array([int(p.parent.name) for p in paths])


def nearest_centre(sample: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> np.ndarray:
    from sklearn.metrics import pairwise_distances_argmin

    centres = np.stack([sample[labels == c].mean(0) for c in range(CLUSTERS)])
    return pairwise_distances_argmin(rows, centres)


def partitions(sample: np.ndarray, starts: int, n_init: int) -> dict[str, list[np.ndarray]]:
    """Labels of the sample by each way of starting k-means."""
    from sklearn.cluster import KMeans

    return {"k-means, one random start": [KMeans(CLUSTERS, n_init=1, random_state=s).fit_predict(sample)
                                          for s in range(starts)],
            f"k-means, lowest inertia of {n_init} starts": [
                KMeans(CLUSTERS, n_init=n_init, random_state=s).fit_predict(sample) for s in range(SEEDS)],
            "Ward-seeded k-means (shipped)": [ward_seeded_kmeans(sample, CLUSTERS)]}


def rows_for(name: str, sample: np.ndarray, rows: np.ndarray, truth: np.ndarray, starts: int, n_init: int) -> list:
    out = []
    for way, labellings in partitions(sample, starts, n_init).items():
        acc = [cluster_accuracy(truth, nearest_centre(sample, labels, rows)) for labels in labellings]
        out.append({"images": name, "warm start": way, "partitions": len(acc), "ACC mean": f"{np.mean(acc):.3f}",
                    "min": f"{min(acc):.3f}", "max": f"{max(acc):.3f}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pyramid-effnet-lite0",
                        help="a pretrained pyramid config (default: %(default)s)")
    parser.add_argument("--shards", type=int, default=10, help="first N CIFAR-10 test shards (default: %(default)s)")
    parser.add_argument("--starts", type=int, default=30, help="single random starts (default: %(default)s)")
    parser.add_argument("--n-init", type=int, default=10,
                        help="starts per seed, of which the lowest inertia is kept (default: %(default)s)")
    args = parser.parse_args()
    header(f"Pretrained pyramid ({args.model}): the warm start's k-means, random or Ward-seeded")
    torch.manual_seed(0)
    config = model_config(args.model)
    model = build_model(config, 0, CLUSTERS).eval()
    size, count = config["image_size"], config["warm_start_images"]
    everything, truth = cifar_features(model, args.shards, size)
    sample = last_stage(model, sample_of_images(expand_shards(cifar_pattern(args.shards)), count, size))
    rows = rows_for(f"CIFAR-10 test ({len(truth):,}; sample {len(sample):,})", sample, everything, truth,
                    args.starts, args.n_init)
    digits, digit_truth = digit_images(size)
    features = last_stage(model, digits)
    rows += rows_for(f"digits ({len(digit_truth):,}, all in the sample)", features, features, digit_truth,
                     args.starts, args.n_init)
    print(table(rows))


if __name__ == "__main__":
    main()
