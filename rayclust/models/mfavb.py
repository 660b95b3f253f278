"""MFAVB: multiple fusing-augmenting ViT blocks over features of two augmented views.

arXiv 2511.08883. Each view's feature vector becomes a short token sequence; the two
sequences pass through shared-weight ViT blocks, are fused (concatenated along the token
axis) into a larger ViT block, and split back into a new pair of augmented positives for
the next fusing-augmenting block. Instance and cluster heads follow, as in Contrastive
Clustering. See docs/models.md for each choice the paper leaves open.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn


class FeatureTokenizer(nn.Module):
    """A D-dim feature becomes ``tokens`` tokens of ``width`` (a learned linear map), plus positions."""

    def __init__(self, feature_dim: int, tokens: int, width: int):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.norm = nn.LayerNorm(feature_dim)
        self.project = nn.Linear(feature_dim, tokens * width)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.project(self.norm(features)).view(-1, self.tokens, self.width)
        return tokens + self.position


class FusingAugmentingBlock(nn.Module):
    """Shared-weight ViT blocks per view -> fuse -> larger ViT block -> split into a new pair."""

    def __init__(self, width: int, heads: int, view_depth: int, fused_depth: int, fused_mlp_ratio: float,
                 dropout: float):
        super().__init__()
        self.view_blocks = nn.Sequential(*[Block(width, heads, proj_drop=dropout) for _ in range(view_depth)])
        self.fused_blocks = nn.Sequential(
            *[Block(width, 2 * heads, mlp_ratio=fused_mlp_ratio, proj_drop=dropout) for _ in range(fused_depth)]
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.view_blocks(a), self.view_blocks(b)  # the same weights for both views
        fused = self.fused_blocks(torch.cat([a, b], dim=1))
        return fused.split(a.shape[1], dim=1)


def projection_head(width: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out_dim))


class MFAVB(nn.Module):
    def __init__(self, feature_dim: int, clusters: int, tokens: int = 8, width: int = 128, heads: int = 4,
                 view_depth: int = 1, fused_depth: int = 1, fused_mlp_ratio: float = 8.0, blocks: int = 2,
                 instance_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.tokenizer = FeatureTokenizer(feature_dim, tokens, width)
        self.blocks = nn.ModuleList(
            FusingAugmentingBlock(width, heads, view_depth, fused_depth, fused_mlp_ratio, dropout)
            for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(width)
        self.instance_head = projection_head(width, instance_dim)
        self.cluster_head = nn.Sequential(projection_head(width, clusters), nn.Softmax(dim=1))

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor):
        """Features of two augmented views [B, D] -> [(z_a, z_b, c_a, c_b)]: one pair of heads."""
        a, b = self.tokenizer(view_a), self.tokenizer(view_b)
        for block in self.blocks:
            a, b = block(a, b)
        h_a, h_b = self.norm(a.mean(1)), self.norm(b.mean(1))
        return [(self.instance_head(h_a), self.instance_head(h_b), self.cluster_head(h_a), self.cluster_head(h_b))]

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities [B, K] of clean features: the feature is its own positive pair."""
        _, _, c_a, c_b = self(features, features)[-1]
        return (c_a + c_b) / 2
