"""Contrastive Clustering's losses (Li et al., AAAI 2021), over the global batch, and SCAN's
self-labelling loss that follows them; TEMI's PMI loss.

Under DDP every worker all-gathers the projections of all workers *with gradients*,
so N workers of batch b optimise exactly the loss of one batch of N*b.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

INSTANCE_TEMPERATURE = 0.5
CLUSTER_TEMPERATURE = 1.0
SELF_LABEL_THRESHOLD = 0.9


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every worker along dim 0; gradients flow back to each worker."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2n rows of ``a`` and ``b``: row i of a and row i of b are positives."""
    n = a.shape[0]
    rows = F.normalize(torch.cat([a, b], dim=0), dim=1)
    logits = rows @ rows.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=a.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(a.device)
    return F.cross_entropy(logits, targets)


def instance_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = INSTANCE_TEMPERATURE) -> torch.Tensor:
    return nt_xent(z_a, z_b, temperature)


def cluster_entropy(probs: torch.Tensor) -> torch.Tensor:
    """log K + sum p log p of the cluster marginal: 0 when balanced, log K when collapsed."""
    marginal = probs.sum(0) / probs.sum()
    return math.log(probs.shape[1]) + (marginal * torch.log(marginal.clamp_min(1e-12))).sum()


def cluster_loss(c_a: torch.Tensor, c_b: torch.Tensor, temperature: float = CLUSTER_TEMPERATURE) -> torch.Tensor:
    """Contrast the K cluster columns of the two views, plus the entropy term against collapse."""
    return nt_xent(c_a.T, c_b.T, temperature) + cluster_entropy(c_a) + cluster_entropy(c_b)


HeadOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # z_a, z_b, c_a, c_b


def per_cluster_head(c: torch.Tensor) -> torch.Tensor:
    """Cluster probabilities as [H, B, K]: a model with one cluster head may give them as [B, K]."""
    return c if c.dim() == 3 else c.unsqueeze(0)


def contrastive_clustering_loss(heads: list[HeadOutputs]) -> tuple[torch.Tensor, dict[str, float]]:
    """Instance + cluster loss over the batch of all workers, averaged over the model's heads.

    A model has one pair of heads (CC-MLP) or several (MFAVB's two contrasts, the pyramid
    model's stages, which PCLC weights equally); its cluster probabilities may come from H
    cluster heads at once ([H, B, K], ``ClusterHeads``), whose cluster losses are averaged too.
    Returns (loss, mean parts for logging).
    """
    instance = cluster = 0.0
    for z_a, z_b, c_a, c_b in heads:
        instance = instance + instance_loss(gather_with_grad(z_a), gather_with_grad(z_b))
        cluster = cluster + torch.stack([
            cluster_loss(gather_with_grad(a), gather_with_grad(b))
            for a, b in zip(per_cluster_head(c_a), per_cluster_head(c_b))
        ]).mean()
    instance, cluster = instance / len(heads), cluster / len(heads)
    return instance + cluster, {"instance_loss": instance.item(), "cluster_loss": cluster.item()}


def self_labelling_loss(probs: torch.Tensor, target_probs: torch.Tensor,
                        threshold: float) -> tuple[torch.Tensor, float]:
    """SCAN's self-labelling step (Van Gansbeke et al., ECCV 2020): a row whose target view is
    assigned with confidence above ``threshold`` becomes a pseudo-label for its other view.

    Cross-entropy weighted by the inverse frequency of each pseudo-label in the batch, so that
    confident large clusters do not absorb the rest. Returns (loss, fraction of rows kept).
    """
    confidence, target = target_probs.max(dim=1)
    keep = confidence > threshold
    if not keep.any():
        return probs.sum() * 0.0, 0.0
    counts = torch.bincount(target[keep], minlength=probs.shape[1]).float()
    weight = counts.sum() / (counts.clamp_min(1) * (counts > 0).sum())
    loss = F.nll_loss(torch.log(probs[keep].clamp_min(1e-8)), target[keep], weight=weight)
    return loss, keep.float().mean().item()


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over every worker (no gradient)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()
    return x


@dataclass(frozen=True)
class PMISettings:
    student_temperature: float
    teacher_temperature: float
    beta: float
    marginal_momentum: float


def pmi_loss(student: torch.Tensor, teacher: torch.Tensor, marginal: torch.Tensor,
             settings: PMISettings) -> tuple[torch.Tensor, torch.Tensor]:
    """TEMI's loss (Adaloglou et al., BMVC 2023) per head [H], and the teacher's updated running
    cluster marginal [H, K], from logits [H, 2B, K] of the rows [x; its partner].

    For a pair (x, x'): -log sum_k (q_s(k|x) q_t(k|x'))^beta / q_t(k), both ways, where q_s is the
    student's, q_t the teacher's and q_t(k) its running marginal; beta < 1 keeps the heads from
    collapsing onto one confident cluster. Each pair is weighted by how much the teacher heads
    agree that x and x' share a cluster, which lowers the weight of neighbours from other classes.
    """
    pairs = student.shape[1] // 2
    student_p = F.softmax(student / settings.student_temperature, -1)
    with torch.no_grad():
        teacher_p = F.softmax(teacher / settings.teacher_temperature, -1)
        agreement = (teacher_p[:, :pairs] * teacher_p[:, pairs:]).sum(-1).mean(0)
        weight = torch.cat([agreement, agreement])
        momentum = settings.marginal_momentum
        marginal = momentum * marginal + (1 - momentum) * global_mean(teacher_p.mean(1))
    partner = torch.cat([teacher_p[:, pairs:], teacher_p[:, :pairs]], 1)
    pmi = (((student_p * partner) ** settings.beta) / marginal[:, None, :]).sum(-1).log()
    return -(weight * pmi).mean(1), marginal
