"""The Contrastive Clustering baseline on features: CC's two MLP heads, nothing in between.

Li et al., AAAI 2021: an instance head Linear-ReLU-Linear into a 128-d space and a cluster
head Linear-ReLU-Linear-Softmax into K clusters, on a backbone's features. Here the
backbone is the frozen encoder that made the feature table, so the heads see its features
directly; this is the yardstick MFAVB's fusing blocks must beat.
"""
from __future__ import annotations

import torch
from torch import nn

from rayclust.models.heads import ClusterHeads, projection_head


class CCMLP(nn.Module):
    def __init__(self, feature_dim: int, clusters: int, instance_dim: int = 128, cluster_heads: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.instance_head = projection_head(feature_dim, instance_dim)
        self.cluster_head = ClusterHeads(feature_dim, clusters, cluster_heads)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor | None = None):
        """Features of two augmented views [B, D] -> [(z_a, z_b, c_a, c_b)] (c: every cluster head's,
        [H, B, K]); of one view -> every cluster head's probabilities [H, B, K] (self-labelling)."""
        if view_b is None:
            return self.cluster_head.all(self.norm(view_a))
        h_a, h_b = self.norm(view_a), self.norm(view_b)
        heads = self.cluster_head
        return [(self.instance_head(h_a), self.instance_head(h_b), heads.all(h_a), heads.all(h_b))]

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities [B, K]: the aligned cluster heads' mean."""
        return self.cluster_head(self.representation(features))

    def representation(self, features: torch.Tensor) -> torch.Tensor:
        """What the cluster heads label: the normalised features [B, D]."""
        return self.norm(features)
