"""Large K: a screen of the feature-model recipe at K = 100 and 1,000 with a plain loop (GPU when present).

The jobs take an hour per 1M-row run on the 2-core machine, so the recipe's choices at large K
(batch size, epochs, self-labelling, how many cluster heads label together) are screened here
with the library's own model, losses and head alignment on the Gaussian mixture of
``train_scale.py``, neighbours from an exact search (torch, on the GPU). The loop is the
training job's, without Ray: a seeded permutation per epoch, one of the views against one of the
5 nearest rows, co-assignments counted in the last contrastive epoch, heads aligned, then
self-labelling epochs, then the empty clusters refilled as the job does. Reported per variant:
empty clusters of the heads' consensus after the refills (what ``predict`` labels with), how many
were refilled, and of the reference head alone, mean confidence, ACC/NMI against the
mixture's truth (and the reference head's ACC), samples/s.

    python benchmarks/large_k.py --rows 1000000 --clusters 1000
    python benchmarks/large_k.py --rows 100000 --clusters 100 --variants base batch-2048
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from train_scale import mixture  # noqa: E402

NEIGHBOURS = 5
VARIANTS = {  # name -> overrides of the shipped ccmlp config
    "base": {"epochs": 2, "self_label_epochs": 0, "batch_size": 512},  # as train_scale.py runs the job
    "shipped": {},
    "epochs-6": {"epochs": 6, "self_label_epochs": 0, "batch_size": 512},  # longer training, same recipe
    "batch-2048": {"epochs": 2, "self_label_epochs": 0, "batch_size": 2048},
    "batch-4096": {"epochs": 2, "self_label_epochs": 0, "batch_size": 4096},
    "one-head": {"epochs": 2, "self_label_epochs": 0, "batch_size": 512, "cluster_heads": 1},
    "batch-2048-self-label": {"epochs": 2, "self_label_epochs": 2, "batch_size": 2048},
    "batch-2xK": {"epochs": 2, "self_label_epochs": 0, "batch_size": "2K"},
}


def exact_neighbours(unit: torch.Tensor, k: int, block: int = 8192) -> torch.Tensor:
    nearest = []
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -2.0
        nearest.append(similarity.topk(k, dim=1).indices)
    return torch.cat(nearest)


def train_variant(config: dict, views: torch.Tensor, nearest: torch.Tensor, clusters: int, seed: int) -> dict:
    from rayclust.losses import contrastive_clustering_loss, per_cluster_head, self_labelling_loss
    from rayclust.models import build_model
    from rayclust.models.heads import REFILL_ROWS, CoAssignments

    device = views.device
    torch.manual_seed(seed)
    model = build_model(config, views.shape[2], clusters).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    rows, batch_size, count = len(views), config["batch_size"], config["cluster_heads"]
    started, steps, reference = time.perf_counter(), 0, 0
    for epoch in range(config["epochs"] + config["self_label_epochs"]):
        contrastive = epoch < config["epochs"]
        counter = CoAssignments(count, clusters, device) if contrastive and epoch == config["epochs"] - 1 else None
        order = torch.randperm(rows, generator=generator, device=device)
        for start in range(0, rows - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            if contrastive:
                first = views[batch, torch.randint(views.shape[1], (len(batch),), generator=generator, device=device)]
                neighbour = views[nearest[batch, torch.randint(NEIGHBOURS, (len(batch),), generator=generator,
                                                               device=device)], 0]
                outputs = model(first, neighbour)
                loss, _ = contrastive_clustering_loss(outputs)
                if counter is not None:
                    counter.add(per_cluster_head(outputs[0][2]).detach())
            else:
                with torch.no_grad():
                    targets = per_cluster_head(model(views[batch, 0]))
                augmented = views[batch, torch.randint(1, views.shape[1], (len(batch),), generator=generator,
                                                       device=device)]
                loss = torch.stack([self_labelling_loss(p, t, config["self_label_threshold"])[0]
                                    for p, t in zip(per_cluster_head(model(augmented)), targets)]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        if counter is not None and count > 1:
            reference, _ = model.cluster_head.align(counter.table())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        refilled = model.cluster_head.refill(model.representation(views[order[:REFILL_ROWS], 0]), seed)
    return {"model": model, "reference": reference, "samples/s": steps * batch_size / seconds, "train s": seconds,
            "refilled": refilled, "refill s": time.perf_counter() - started - seconds}


def labels_of(model, clean: torch.Tensor, reference: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean-of-heads cluster, its confidence, the reference head's own cluster) of every row."""
    model.eval()
    means, confidences, first = [], [], []
    with torch.no_grad():
        for start in range(0, len(clean), 65536):
            part = clean[start:start + 65536]
            probabilities = model.predict(part)
            confidence, cluster = probabilities.max(1)
            means.append(cluster.cpu()), confidences.append(confidence.cpu())
            first.append(model.cluster_head.heads[reference](model.norm(part)).argmax(1).cpu())
    return torch.cat(means).numpy(), torch.cat(confidences).numpy(), torch.cat(first).numpy()


def main() -> None:
    from rayclust.evaluation import cluster_metrics
    from rayclust.models import model_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    clean, views, truth = mixture(args.rows, args.clusters)
    views = torch.from_numpy(np.concatenate([clean[:, None], views], axis=1)).to(device)
    unit = torch.nn.functional.normalize(views[:, 0], dim=1)
    nearest = exact_neighbours(unit, NEIGHBOURS)
    print(f"{args.rows:,} rows, K {args.clusters}, on {device}: data and exact neighbours in "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    for name in args.variants:
        overrides = dict(VARIANTS[name])
        if overrides.get("batch_size") == "2K":
            overrides["batch_size"] = max(512, 2 * args.clusters)
        config = model_config("ccmlp", **overrides)
        trained = train_variant(config, views, nearest, args.clusters, args.seed)
        cluster, confidence, alone = labels_of(trained["model"], views[:, 0], trained["reference"])
        metrics, alone_metrics = cluster_metrics(truth, cluster), cluster_metrics(truth, alone)
        row = {"variant": name, "batch": config["batch_size"], "epochs": config["epochs"],
               "self-label": config["self_label_epochs"], "heads": config["cluster_heads"],
               "empty": args.clusters - len(np.unique(cluster)), "refilled": trained["refilled"],
               "empty (reference head alone)": args.clusters - len(np.unique(alone)),
               "confidence": float(confidence.mean()), "ACC": metrics["acc"], "NMI": metrics["nmi"],
               "ACC (reference head alone)": alone_metrics["acc"],
               "samples/s": trained["samples/s"], "train s": trained["train s"], "refill s": trained["refill s"]}
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
