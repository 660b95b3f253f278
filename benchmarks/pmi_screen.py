"""PMI screen: TEMI-style cluster heads (issue 13) in a plain loop, before building them as a model.

TEMI (Adaloglou et al., BMVC 2023) trains many MLP heads on frozen features with a pointwise-
mutual-information loss between a row and one of its nearest rows: the student's probabilities
of one against an EMA teacher's of the other, raised to beta and divided by the teacher's
running cluster marginal, each pair weighted by how much the teacher heads agree on it; the
head with the lowest loss labels. The heads (Linear-GELU-Linear into a 256-d bottleneck,
L2-normalised, then a weight-normalised linear layer into K) and the loss are the library's
(``rayclust.models.temi``, ``rayclust.losses.pmi_loss``: first written here, then built as
``--model temi``); this loop differs from the model's training in its per-step teacher momentum,
AdamW, and inputs standardised over the whole table. Data: the Gaussian mixture of
``train_scale.py`` (K known) or a features file such as ``../shared/data/cifar10-test-effnetlite0.npz``
(clean + views + labels). Neighbours: exact, cosine. Prints the chosen head's empty clusters,
mean confidence, ACC/NMI and every head's ACC.

    python benchmarks/pmi_screen.py --rows 100000 --clusters 1000 --epochs 3 --batch 256 --teacher-temperature 0.05
    python benchmarks/pmi_screen.py --npz ../shared/data/cifar10-test-effnetlite0.npz \\
        --clusters 10 --heads 16 --epochs 20
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rayclust.losses import PMISettings, pmi_loss  # noqa: E402
from rayclust.models.temi import PMIHeads  # noqa: E402

from large_k import exact_neighbours  # noqa: E402
from train_scale import mixture  # noqa: E402

MARGINAL_MOMENTUM = 0.9


def train(views: torch.Tensor, nearest: torch.Tensor, args) -> tuple[PMIHeads, int, torch.Tensor, torch.Tensor]:
    """(teacher, the head with the lowest loss in the last epoch, the standardisation's mean, std)."""
    torch.manual_seed(args.seed)
    mean, std = views[:, 0].mean(0), views[:, 0].std(0)
    student = PMIHeads(views.shape[2], args.clusters, args.heads, hidden=512, bottleneck=256)
    settings = PMISettings(args.student_temperature, args.teacher_temperature, args.beta, MARGINAL_MOMENTUM)
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=1e-4)
    marginal = torch.full((args.heads, args.clusters), 1 / args.clusters)
    generator = torch.Generator().manual_seed(args.seed + 1)
    steps_per_epoch = len(views) // args.batch
    total, step, started = steps_per_epoch * args.epochs, 0, time.perf_counter()
    for epoch in range(args.epochs):
        order, head_loss = torch.randperm(len(views), generator=generator), torch.zeros(args.heads)
        for s in range(steps_per_epoch):
            rows = order[s * args.batch:(s + 1) * args.batch]
            first = views[rows, torch.randint(views.shape[1], (len(rows),), generator=generator)]
            neighbour = views[nearest[rows, torch.randint(nearest.shape[1], (len(rows),), generator=generator)], 0]
            pair = (torch.cat([first, neighbour]) - mean) / std
            per_head, marginal = pmi_loss(student(pair), teacher(pair), marginal, settings)
            optimizer.zero_grad()
            per_head.sum().backward()
            optimizer.step()
            momentum = 1 - (1 - args.ema) * (math.cos(math.pi * step / total) + 1) / 2
            with torch.no_grad():
                for t, s_ in zip(teacher.parameters(), student.parameters()):
                    t.mul_(momentum).add_(s_.detach(), alpha=1 - momentum)
            head_loss += per_head.detach()
            step += 1
        head_loss /= steps_per_epoch
        print(f"  epoch {epoch + 1}: loss {head_loss.mean():.4f} (lowest head {head_loss.min():.4f}), "
              f"{step * args.batch / (time.perf_counter() - started):.0f} samples/s", flush=True)
    return teacher, int(head_loss.argmin()), mean, std


def main() -> None:
    from rayclust.evaluation import cluster_metrics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="mixture rows (without --npz)")
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--npz", help="features file with clean, views and labels instead of the mixture")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.6)
    parser.add_argument("--student-temperature", type=float, default=0.1)
    parser.add_argument("--teacher-temperature", type=float, default=0.1)
    parser.add_argument("--ema", type=float, default=0.99, help="the teacher's first momentum (cosine to 1)")
    parser.add_argument("--neighbours", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.npz:
        data = np.load(args.npz)
        truth = data["labels"].astype(int)
        views = torch.from_numpy(np.concatenate([data["clean"][:, None], data["views"]], 1).astype(np.float32))
    else:
        clean, augmented, truth = mixture(args.rows, args.clusters)
        views = torch.from_numpy(np.concatenate([clean[:, None], augmented], 1))
    nearest = exact_neighbours(F.normalize(views[:, 0], dim=1), args.neighbours)
    print(vars(args), flush=True)
    teacher, best, mean, std = train(views, nearest, args)
    with torch.no_grad():
        clean = (views[:, 0] - mean) / std
        logits = torch.cat([teacher(clean[i:i + 65536]) for i in range(0, len(clean), 65536)], 1)
    confidence, cluster = F.softmax(logits[best] / args.teacher_temperature, -1).max(1)
    metrics = cluster_metrics(truth, cluster.numpy())
    heads = [round(cluster_metrics(truth, head.argmax(1).numpy())["acc"], 3) for head in logits]
    print(f"head {best} (lowest loss): empty {args.clusters - len(np.unique(cluster.numpy()))}, "
          f"confidence {confidence.mean():.3f}, ACC {metrics['acc']:.3f}, NMI {metrics['nmi']:.3f}; "
          f"every head's ACC {heads}", flush=True)


if __name__ == "__main__":
    main()
