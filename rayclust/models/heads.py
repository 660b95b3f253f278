"""The projection heads Contrastive Clustering puts on a representation, shared by the feature models."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

if TYPE_CHECKING:
    from sklearn.cluster import KMeans

# Empty clusters are refilled from the representations of this many rows (``ClusterHeads.refill``):
# a bounded sample whatever the table, 50 rows per cluster at K = 1,000.
REFILL_ROWS = 50_000
# A warm start (``ClusterHeads.warm_start``) fits each head to k-means of a sample by cross-entropy
# in batches of this size, for this many passes over the sample but at least this many steps.
WARM_START_BATCH = 1024
WARM_START_PASSES = 5
WARM_START_MIN_STEPS = 200


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

    The mean starves the clusters the heads do not share (at K = 100 on a Gaussian mixture, 13 end
    empty; at K = 1,000 about a third) and merges what they held into others; one head alone can
    leave clusters empty too. ``refill`` gives each empty cluster one half of the cluster that a
    split in two helps most (bisecting k-means' choice), measured on a sample of rows; the splits
    are buffers too, applied in their order.
    """

    def __init__(self, width: int, clusters: int, count: int = 1):
        super().__init__()
        if count < 1:
            raise ValueError(f"cluster_heads must be at least 1, not {count}")
        self.heads = nn.ModuleList(nn.Sequential(projection_head(width, clusters), nn.Softmax(dim=1))
                                   for _ in range(count))
        self.register_buffer("alignment", torch.arange(clusters).repeat(count, 1))
        for name, value in no_refills(clusters, width).items():
            self.register_buffer(name, value)

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        """The aligned heads' mean cluster probabilities [B, K], with the refilled clusters split off."""
        mean = torch.stack([head(representation)[:, self.alignment[h]] for h, head in enumerate(self.heads)]).mean(0)
        return self.split_off(representation, mean)

    def split_off(self, representation: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        """Rows of a split cluster nearer the centre of its half that left swap that cluster's
        probability with the refilled cluster's (so the confidence is the one the heads gave).
        The splits apply in their order; a row moves at most once per step, to the first later
        split of the cluster it is in that takes it, so the loop runs as deep as the splits nest."""
        refills = int((self.refill_child >= 0).sum())
        if refills == 0:
            return probabilities
        child, parent = self.refill_child[:refills], self.refill_parent[:refills]
        stays, leaves = self.refill_centres[:refills].unbind(1)
        unit = nn.functional.normalize(representation, dim=1)
        # |u - leaves|^2 < |u - stays|^2, for every row and split at once
        leaving = 2 * unit @ (leaves - stays).T > leaves.pow(2).sum(1) - stays.pow(2).sum(1)
        slots = torch.arange(refills, device=unit.device)
        cluster, after = probabilities.argmax(1), torch.zeros(len(unit), dtype=torch.long, device=unit.device)
        while (takes := leaving & (parent == cluster[:, None]) & (slots >= after[:, None])).any():
            rows = torch.nonzero(takes.any(1)).squeeze(1)
            slot = takes[rows].int().argmax(1)  # the first split that takes the row
            was, now = cluster[rows], child[slot]
            probabilities[rows, now], probabilities[rows, was] = probabilities[rows, was], probabilities[rows, now]
            cluster[rows], after[rows] = now, slot + 1
        return probabilities

    @torch.no_grad()
    def refill(self, representation: torch.Tensor, seed: int = 0) -> int:
        """Split off a cluster for each cluster the heads' mean leaves empty on ``representation``
        (a sample of rows [N, width]); returns how many. Replaces earlier refills."""
        for name, value in no_refills(*self.refill_centres.shape[::2]).items():
            getattr(self, name).copy_(value)
        unit = nn.functional.normalize(representation.float(), dim=1).cpu().numpy()
        cluster = self(representation).argmax(1).cpu().numpy()
        halves = {}  # cluster -> (what splitting it in two takes off its sum of squares, the split)
        empty = np.setdiff1d(np.arange(self.refill_child.numel()), cluster)
        for slot, child in enumerate(empty):
            for c in np.setdiff1d(np.unique(cluster), list(halves)):
                halves[c] = best_split(unit[cluster == c], seed)
            parent = max(halves, key=lambda c: halves[c][0])
            split = halves.pop(parent)[1]
            if split is None:  # no cluster left with rows enough to split
                break
            members = np.nonzero(cluster == parent)[0]
            cluster[members[split.labels_ == 1]] = child
            self.refill_child[slot], self.refill_parent[slot] = int(child), int(parent)
            self.refill_centres[slot] = torch.from_numpy(split.cluster_centers_).to(self.refill_centres)
        return int((self.refill_child >= 0).sum())

    def warm_start(self, representation: torch.Tensor, seed: int = 0) -> list[np.ndarray]:
        """Start every head from k-means of ``representation`` (a sample of rows [N, width]; one
        k-means per head, each its own seed) instead of from random weights: each head learns its
        partition by cross-entropy (``fit_to_labels``), then contrastive training
        refines it. Returns each head's k-means labels."""
        from sklearn.cluster import MiniBatchKMeans

        # float64: scikit-learn's distances upcast float32 in chunks, several times slower
        unit = nn.functional.normalize(representation.double(), dim=1).cpu().numpy()
        clusters = self.alignment.shape[1]
        batch = min(WARM_START_BATCH, len(unit))
        steps = max(WARM_START_MIN_STEPS, WARM_START_PASSES * len(unit) // batch)
        generator, partitions = torch.Generator().manual_seed(seed), []
        for h, head in enumerate(self.heads):
            kmeans = MiniBatchKMeans(clusters, n_init=1, batch_size=4096, random_state=seed * len(self.heads) + h)
            target = kmeans.fit_predict(unit)
            partitions.append(target)
            fit_to_labels(head[0], representation, torch.from_numpy(target).long(), generator, batch, steps)
        return partitions

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint from before refills had none."""
        for name, value in no_refills(*self.refill_centres.shape[::2]).items():
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def all(self, representation: torch.Tensor) -> torch.Tensor:
        """Every head's own cluster probabilities [H, B, K]."""
        return torch.stack([head(representation) for head in self.heads])

    def align(self, co_assigned: torch.Tensor) -> tuple[int, list[float]]:
        """Renumber the heads' clusters after the head that agrees most with the others.

        ``co_assigned`` [H, H, K, K] (``CoAssignments.table``) counts, for heads h and g, the rows
        head h puts in cluster k
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


def fit_to_labels(projector: nn.Module, rows: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
                  batch: int, steps: int) -> None:
    """A cluster head's warm start: ``steps`` Adam steps of cross-entropy of ``projector(rows)``
    against ``target``, each on ``batch`` rows drawn at random."""
    optimizer = torch.optim.Adam(projector.parameters(), lr=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            chosen = torch.randint(len(rows), (batch,), generator=generator)
            loss = nn.functional.cross_entropy(projector(rows[chosen]), target[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def no_refills(clusters: int, width: int) -> dict[str, torch.Tensor]:
    """The refill buffers of a model without refills: slots of (refilled cluster, the cluster it
    split from, [the centre of the half that stays, of the half that leaves]), -1 when unused."""
    return {"refill_child": torch.full((clusters,), -1), "refill_parent": torch.full((clusters,), -1),
            "refill_centres": torch.zeros(clusters, 2, width)}


def best_split(unit: np.ndarray, seed: int) -> tuple[float, KMeans | None]:
    """2-means of a cluster's rows, the larger half labelled 0, and how much it lowers their sum of
    squares; (-1, None) for a cluster of fewer than 4 rows."""
    from sklearn.cluster import KMeans  # here: importing sklearn costs every predicting process a second

    if len(unit) < 4:
        return -1.0, None
    split = KMeans(2, n_init=3, random_state=seed).fit(unit)
    if (split.labels_ == 1).sum() > (split.labels_ == 0).sum():
        split.labels_, split.cluster_centers_ = 1 - split.labels_, split.cluster_centers_[::-1].copy()
    return float(((unit - unit.mean(0)) ** 2).sum() - split.inertia_), split


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
