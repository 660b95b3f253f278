"""A trained pyramid model's stages, one by one and together (issue 13: a stage ensemble only if it
measures better).

Loads the model that a lake's ``LATEST`` names (``benchmarks/_pyramid.py --lake DIR`` keeps one),
runs the clean images of the CIFAR-10 test shards through it once, and scores against their
labels: each stage's cluster head alone, the last stage (what the infer job labels with), the
plain mean of the four stages (``predict_stages: "all"``), the mean after renumbering each stage's
clusters to the last stage's (Hungarian matching on their co-assignments, as the feature models'
cluster heads are aligned), and k-means on the last stage's pooled map.

    python benchmarks/pyramid_stages.py --lake /tmp/pyramid-lake
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cifar_pattern, header, table  # noqa: E402

from rayclust.evaluation import cluster_metrics, kmeans_labels  # noqa: E402
from rayclust.lake import Lake  # noqa: E402
from rayclust.models.checkpoint import checkpoint_description, latest_model, load_model  # noqa: E402
from rayclust.shards import expand_shards  # noqa: E402
from rayclust.views import clean_view  # noqa: E402


def stage_outputs(model, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each stage's cluster probabilities [B, K] and the last stage's pooled map [B, C]."""
    with torch.no_grad():
        maps = model.pyramid(images)
        return [heads(m)[1] for heads, m in zip(model.heads, maps)], maps[-1].mean((2, 3))


def aligned_to(reference: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """``probabilities``' columns renumbered so its clusters match ``reference``'s labels best."""
    clusters = probabilities.shape[1]
    counts = np.zeros((clusters, clusters))
    np.add.at(counts, (reference, probabilities.argmax(1)), 1)
    rows, columns = linear_sum_assignment(counts, maximize=True)
    order = np.empty(clusters, dtype=int)
    order[rows] = columns
    return probabilities[:, order]


def scored(truth: np.ndarray, predicted: np.ndarray) -> dict[str, str]:
    return {name: f"{value:.3f}" for name, value in cluster_metrics(truth, predicted).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True, help="a lake whose LATEST is a trained pyramid model")
    parser.add_argument("--shards", type=int, default=10, help="first N CIFAR-10 test shards (default: %(default)s)")
    args = parser.parse_args()
    header("Pyramid model: each stage, the last, and the stages together")
    lake = Lake.open(args.lake)
    latest = latest_model(lake)
    size = checkpoint_description(lake, latest)["model_config"]["image_size"]
    model = load_model(lake, latest)
    transform = clean_view(size)
    per_stage, pooled, truth = [], [], []
    dataset = wds.WebDataset(expand_shards(cifar_pattern(args.shards)), shardshuffle=False).decode("pil")
    for batch in wds.WebLoader(dataset.to_tuple("jpg;png", "cls").map_tuple(transform, int).batched(256),
                               batch_size=None):
        images, labels = batch
        stages, last_pooled = stage_outputs(model, images)
        per_stage.append([s.numpy() for s in stages])
        pooled.append(last_pooled.numpy())
        truth.append(np.asarray(labels))
    truth = np.concatenate(truth)
    stages = [np.concatenate([batch[i] for batch in per_stage]) for i in range(len(per_stage[0]))]
    last = stages[-1].argmax(1)
    rows = [{"predictor": f"stage {i + 1} alone", **scored(truth, s.argmax(1))} for i, s in enumerate(stages)]
    rows.append({"predictor": "last stage (the infer job's)", **scored(truth, last)})
    rows.append({"predictor": "mean of the 4 stages (predict_stages all)",
                 **scored(truth, np.mean(stages, axis=0).argmax(1))})
    aligned = [aligned_to(last, s) for s in stages]
    rows.append({"predictor": "mean of the 4 stages, aligned to the last",
                 **scored(truth, np.mean(aligned, 0).argmax(1))})
    rows.append({"predictor": "mean of stages 3-4, aligned", **scored(truth, np.mean(aligned[2:], 0).argmax(1))})
    features = np.concatenate(pooled)
    clusters = stages[-1].shape[1]
    rows.append({"predictor": "k-means on the last stage's pooled map",
                 **scored(truth, kmeans_labels(features, clusters, seed=0))})
    print(f"model {latest['model_version']}, {len(truth)} images at {size} px\n")
    print(table(rows))


if __name__ == "__main__":
    main()
