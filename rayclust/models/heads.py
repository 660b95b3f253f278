"""The projection heads Contrastive Clustering puts on a representation, shared by the feature models."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn


def projection_head(width: int, out_dim: int) -> nn.Sequential:
    """CC's Linear-ReLU-Linear projector."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out_dim))


class ClusterHeads(nn.Module):
    """``count`` cluster heads (projector + softmax over K), each from its own random start, that
    label together.

    Whether one Contrastive Clustering cluster head finds a good partition or merges two classes
    depends on its initialisation as much as on the data (docs/models.md), and no unsupervised
    signal tells the good heads from the bad. The heads' consensus is steadier: once training has
    seen their co-assignments, ``align`` renumbers every head's clusters to match the most
    central head's (Hungarian matching), and the model's probabilities are the mean of the aligned
    heads. Training's contrastive loss sees every head (``all``); ``alignment`` is a buffer, so
    the checkpoint keeps it.
    """

    def __init__(self, width: int, clusters: int, count: int = 1):
        super().__init__()
        if count < 1:
            raise ValueError(f"cluster_heads must be at least 1, not {count}")
        self.heads = nn.ModuleList(nn.Sequential(projection_head(width, clusters), nn.Softmax(dim=1))
                                   for _ in range(count))
        self.register_buffer("alignment", torch.arange(clusters).repeat(count, 1))

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        """The aligned heads' mean cluster probabilities [B, K]."""
        return torch.stack([head(representation)[:, self.alignment[h]] for h, head in enumerate(self.heads)]).mean(0)

    def all(self, representation: torch.Tensor) -> torch.Tensor:
        """Every head's own cluster probabilities [H, B, K]."""
        return torch.stack([head(representation) for head in self.heads])

    def align(self, co_assigned: torch.Tensor) -> tuple[int, list[float]]:
        """Renumber the heads' clusters after the head that agrees most with the others.

        ``co_assigned`` [H, H, K, K] (``CoAssignments.table``) counts, for heads h and g, the rows head h puts in cluster k
        and head g in cluster l. Returns (the reference head, each head's share of rows on which
        it agrees with the reference once matched).
        """
        count, counts = len(self.heads), co_assigned.cpu().numpy()
        matches = [[linear_sum_assignment(counts[r, h], maximize=True) for h in range(count)] for r in range(count)]
        agreement = torch.tensor([[float(counts[r, h][rows, columns].sum() / counts[r, h].sum())
                                   for h, (rows, columns) in enumerate(row)] for r, row in enumerate(matches)])
        reference = int(agreement.sum(1).argmax())
        for h, (rows, columns) in enumerate(matches[reference]):
            self.alignment[h, torch.from_numpy(rows)] = torch.from_numpy(columns).to(self.alignment.device)
        return reference, agreement[reference].tolist()


class CoAssignments:
    """Running counts [H, H, K, K] of the rows head h puts in cluster k and head g in cluster l,
    for ``ClusterHeads.align``. Batches add to one tensor in place: a count tensor per batch
    would cost H^2 K^2 numbers every step (25 million at K = 1,000 with five heads)."""

    def __init__(self, heads: int, clusters: int, device: torch.device | str = "cpu"):
        self.heads, self.clusters = heads, clusters
        self.counts = torch.zeros(heads * heads * clusters * clusters, device=device)
        pairs = torch.arange(heads * heads, device=device)
        self.first, self.second = pairs // heads, pairs % heads

    def add(self, probabilities: torch.Tensor) -> None:
        """Count one batch from the heads' probabilities [H, B, K]."""
        assigned = probabilities.argmax(2)
        pair = self.first[:, None] * self.heads + self.second[:, None]
        index = (pair * self.clusters + assigned[self.first]) * self.clusters + assigned[self.second]
        self.counts.index_add_(0, index.flatten(), torch.ones(index.numel(), device=self.counts.device))

    def table(self) -> torch.Tensor:
        return self.counts.view(self.heads, self.heads, self.clusters, self.clusters)
