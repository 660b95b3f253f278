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

from rayclust.models.heads import ClusterHeads, projection_head

CONTRASTS = ("self", "pair")


class FeatureTokenizer(nn.Module):
    """A D-dim feature is split into ``tokens`` chunks of D/tokens, each projected to ``width``
    (one shared linear map), plus a learned position per chunk."""

    def __init__(self, feature_dim: int, tokens: int, width: int):
        super().__init__()
        if feature_dim % tokens:
            raise ValueError(f"feature dim {feature_dim} does not split into {tokens} tokens")
        self.tokens = tokens
        self.norm = nn.LayerNorm(feature_dim)
        self.project = nn.Linear(feature_dim // tokens, width)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        chunks = self.norm(features).view(features.shape[0], self.tokens, -1)
        return self.project(chunks) + self.position


class FusingAugmentingBlock(nn.Module):
    """Shared-weight ViT blocks per view -> fuse -> larger ViT block -> split into a new pair."""

    def __init__(self, width: int, heads: int, view_depth: int, fused_depth: int, fused_mlp_ratio: float,
                 dropout: float, layer_scale: float | None):
        super().__init__()
        self.view_blocks = nn.Sequential(
            *[Block(width, heads, proj_drop=dropout, init_values=layer_scale) for _ in range(view_depth)]
        )
        self.fused_blocks = nn.Sequential(
            *[Block(width, 2 * heads, mlp_ratio=fused_mlp_ratio, proj_drop=dropout, init_values=layer_scale)
              for _ in range(fused_depth)]
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.view_blocks(a), self.view_blocks(b)  # the same weights for both views
        fused = self.fused_blocks(torch.cat([a, b], dim=1))
        return fused.split(a.shape[1], dim=1)


class FusingEncoder(nn.Module):
    """MFAVB's trunk: the tokenizer and the fusing-augmenting blocks, read out flat and normalised
    (``width`` = tokens x token width). Any head can sit on it (MFAVB's CC heads, TEMI's)."""

    def __init__(self, feature_dim: int, tokens: int = 8, width: int = 128, heads: int = 4, view_depth: int = 1,
                 fused_depth: int = 1, fused_mlp_ratio: float = 8.0, blocks: int = 2, dropout: float = 0.0,
                 layer_scale: float | None = 1e-4):
        super().__init__()
        self.tokenizer = FeatureTokenizer(feature_dim, tokens, width)
        self.blocks = nn.ModuleList(
            FusingAugmentingBlock(width, heads, view_depth, fused_depth, fused_mlp_ratio, dropout, layer_scale)
            for _ in range(blocks)
        )
        self.width = tokens * width
        self.norm = nn.LayerNorm(self.width)

    def encode(self, view_a: torch.Tensor, view_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views' features [B, D] through every fusing-augmenting block -> the final pair [B, T*W]."""
        a, b = self.tokenizer(view_a), self.tokenizer(view_b)
        for block in self.blocks:
            a, b = block(a, b)
        return self.norm(a.flatten(1)), self.norm(b.flatten(1))


class MFAVB(FusingEncoder):
    def __init__(self, feature_dim: int, clusters: int, tokens: int = 8, width: int = 128, heads: int = 4,
                 view_depth: int = 1, fused_depth: int = 1, fused_mlp_ratio: float = 8.0, blocks: int = 2,
                 instance_dim: int = 128, dropout: float = 0.0, layer_scale: float | None = 1e-4,
                 contrast: str = "self", cluster_heads: int = 1):
        super().__init__(feature_dim, tokens, width, heads, view_depth, fused_depth, fused_mlp_ratio, blocks, dropout,
                         layer_scale)
        if contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {CONTRASTS}, not {contrast!r}")
        self.contrast = contrast
        self.instance_head = projection_head(self.width, instance_dim)
        self.cluster_head = ClusterHeads(self.width, clusters, cluster_heads)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor | None = None):
        """Features of a positive pair [B, D] -> [(z_a, z_b, c_a, c_b), ...] for the loss (c: every
        cluster head's, [H, B, K]); of one view -> every cluster head's probabilities [H, B, K] of
        the feature fused with itself (self-labelling).

        "pair" contrasts the two halves of one fused sequence, as the paper reads literally; but
        each half has seen the other, so the fused block can make them agree by copying
        (measured: the loss keeps falling while the clusters get worse). "self" contrasts each
        fused half with the other view fused with itself, the computation ``predict`` does;
        a half cannot copy a view it was never shown. See docs/models.md.
        """
        if view_b is None:
            return self.cluster_head.all(self.encode(view_a, view_a)[0])
        fused_a, fused_b = self.encode(view_a, view_b)
        if self.contrast == "pair":
            return [self.heads(fused_a, fused_b)]
        both = torch.cat([view_a, view_b])
        self_a, self_b = self.encode(both, both)[0].chunk(2)
        return [self.heads(fused_a, self_b), self.heads(self_a, fused_b)]

    def heads(self, a: torch.Tensor, b: torch.Tensor):
        return self.instance_head(a), self.instance_head(b), self.cluster_head.all(a), self.cluster_head.all(b)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities [B, K] of clean features (the feature is its own positive pair):
        the aligned cluster heads' mean."""
        return self.cluster_head(self.representation(features))

    def representation(self, features: torch.Tensor) -> torch.Tensor:
        """What the cluster heads label: clean features fused with themselves [B, T*W]."""
        return self.encode(features, features)[0]
