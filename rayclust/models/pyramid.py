"""The pyramid model: PCLC's twin contrastive heads on every stage of a CMT-style backbone.

Pyramid contrastive learning for clustering (Zhou, Huang & Wang, Neural Networks 2025) on a
mixed CNN-Transformer after CMT (Guo et al., CVPR 2022): a conv stem, then four stages, each
downsampling and stacking CMT blocks (local perception unit, attention over spatially reduced
keys and values, inverted-residual conv FFN), or on the four stages of a pretrained backbone
(``PretrainedPyramid``, ``rayclust.models.backbones``). Every stage's pooled map gets an
instance head and a cluster head; the loss averages over the four stages. Trains on images, not
features. See docs/models.md for each choice.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, LayerNorm2d
from torch import nn

from rayclust.errors import UserError
from rayclust.models.heads import fit_to_labels

STAGES = 4
WARM_START_STEPS = 200  # cross-entropy steps fitting a cluster head to k-means (seconds on a CPU)
WARD_ROWS = 5_000  # Ward's linkage holds every pair's distance: 100 MB at this many rows


class LocalPerceptionUnit(nn.Module):
    """CMT's LPU: x + depthwise 3x3 conv(x); gives attention translation-invariant position cues."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, groups=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class LightweightAttention(nn.Module):
    """CMT's LMHSA: queries from every position, keys and values from a map shrunk ``reduction``
    times per side by a strided depthwise conv, so attention costs N x N/r^2 instead of N x N."""

    def __init__(self, width: int, heads: int, reduction: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.reduce = (nn.Sequential(nn.Conv2d(width, width, reduction, reduction, groups=width), LayerNorm2d(width))
                       if reduction > 1 else nn.Identity())
        self.project = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        query = self.query(x.flatten(2).transpose(1, 2)).view(b, h * w, self.heads, -1).transpose(1, 2)
        reduced = self.reduce(x).flatten(2).transpose(1, 2)
        key, value = self.key_value(reduced).view(b, reduced.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.project(out.transpose(1, 2).reshape(b, h * w, c)).transpose(1, 2).view(b, c, h, w)


class InvertedResidualFFN(nn.Module):
    """CMT's IRFFN: 1x1 expand, depthwise 3x3 with a shortcut, 1x1 project (BN after each conv)."""

    def __init__(self, width: int, ratio: float):
        super().__init__()
        hidden = int(width * ratio)
        self.expand = ConvNormAct(width, hidden, 1, act_layer=nn.GELU)
        self.depthwise = ConvNormAct(hidden, hidden, 3, groups=hidden, act_layer=nn.GELU)
        self.project = ConvNormAct(hidden, width, 1, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)
        return self.project(x + self.depthwise(x))


class CMTBlock(nn.Module):
    def __init__(self, width: int, heads: int, reduction: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.local = LocalPerceptionUnit(width)
        self.norm1, self.norm2 = LayerNorm2d(width), LayerNorm2d(width)
        self.attention = LightweightAttention(width, heads, reduction)
        self.ffn = InvertedResidualFFN(width, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.local(x)
        x = x + self.drop_path(self.attention(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class Stage(nn.Sequential):
    """Halve the map with CMT's 2x2 stride-2 patch aggregation (+ LayerNorm), then ``depth`` blocks."""

    def __init__(self, in_width: int, width: int, depth: int, heads: int, reduction: int, mlp_ratio: float,
                 drop_paths: list[float]):
        super().__init__(
            nn.Conv2d(in_width, width, 2, 2), LayerNorm2d(width),
            *(CMTBlock(width, heads, reduction, mlp_ratio, drop_paths[i]) for i in range(depth)),
        )


def projector(width: int, out_dim: int) -> nn.Sequential:
    """PCLC's projector: BN-ReLU-Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width),
                         nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, out_dim))


class TwinHeads(nn.Module):
    """One stage's instance head and cluster head (softmax over K) on its globally pooled map."""

    def __init__(self, width: int, instance_dim: int, clusters: int):
        super().__init__()
        self.instance = projector(width, instance_dim)
        self.cluster = nn.Sequential(projector(width, clusters), nn.Softmax(dim=1))

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = feature_map.mean((2, 3))
        return self.instance(pooled), self.cluster(pooled)


class TwinHeadPyramid(nn.Module):
    """PCLC's twin heads on the four maps of ``pyramid(images)``, which a subclass defines.
    ``predict_stages`` "last" predicts with the last stage's cluster head, "all" with the mean
    of all four."""

    heads: nn.ModuleList

    def __init__(self, predict_stages: str):
        super().__init__()
        if predict_stages not in ("last", "all"):
            raise UserError(f"pyramid config: predict_stages is 'last' or 'all', got {predict_stages!r}")
        self.predict_stages = predict_stages

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor):
        """Two augmented views [B, 3, S, S] -> [(z_a, z_b, c_a, c_b)] per stage, first to last."""
        maps_a, maps_b = self.pyramid(view_a), self.pyramid(view_b)
        outputs = []
        for heads, map_a, map_b in zip(self.heads, maps_a, maps_b):
            (z_a, c_a), (z_b, c_b) = heads(map_a), heads(map_b)
            outputs.append((z_a, z_b, c_a, c_b))
        return outputs

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities [B, K] of clean images: the last stage's cluster head, or the stages' mean."""
        maps = self.pyramid(images)
        if self.predict_stages == "last":
            return self.heads[-1](maps[-1])[1]
        return torch.stack([heads(m)[1] for heads, m in zip(self.heads, maps)]).mean(0)


class Pyramid(TwinHeadPyramid):
    """CMT-style backbone with PCLC's twin heads at each of its four stages.

    ``depths``/``widths``/``heads``/``kv_reduction`` are per stage; CMT-Ti is 2-2-10-2,
    46-92-184-368, 1-2-4-8, 8-4-2-1 (``model_configs/pyramid-cmt-ti.json``). The map sizes are
    image_size / stem_stride / 2, /4, /8, /16; each stage's map must be at least its reduction.
    """

    def __init__(self, clusters: int, image_size: int = 32, depths: tuple = (1, 1, 3, 1),
                 widths: tuple = (32, 64, 128, 256), heads: tuple = (1, 2, 4, 8), kv_reduction: tuple = (2, 1, 1, 1),
                 stem_width: int = 16, stem_stride: int = 2, mlp_ratio: float = 3.6, instance_dim: int = 128,
                 drop_path: float = 0.0, predict_stages: str = "last"):
        super().__init__(predict_stages)
        check_shape(image_size, depths, widths, heads, kv_reduction, stem_stride)
        self.stem = nn.Sequential(
            ConvNormAct(3, stem_width, 3, stride=stem_stride, act_layer=nn.GELU),
            ConvNormAct(stem_width, stem_width, 3, act_layer=nn.GELU),
            ConvNormAct(stem_width, stem_width, 3, act_layer=nn.GELU),
        )
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()  # stochastic depth grows with depth
        starts = [sum(depths[:i]) for i in range(STAGES)]
        in_widths = [stem_width, *widths[:-1]]
        self.stages = nn.ModuleList(
            Stage(in_widths[i], widths[i], depths[i], heads[i], kv_reduction[i], mlp_ratio,
                  rates[starts[i]:starts[i] + depths[i]])
            for i in range(STAGES)
        )
        self.heads = nn.ModuleList(TwinHeads(w, instance_dim, clusters) for w in widths)

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' feature maps [B, widths[i], H_i, W_i] of images [B, 3, S, S]."""
        maps, x = [], self.stem(images)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class PretrainedPyramid(TwinHeadPyramid):
    """PCLC's twin heads on the four stages of a pretrained backbone, fine-tuned end to end from its
    ``frozen_stages``-th stage on: the stem and the first ``frozen_stages`` stages keep their
    pretrained weights (the early, high-resolution layers cost most of a CPU step and change least
    in fine-tuning). With ``pretrained_batchnorm`` every BatchNorm of the backbone normalises with
    its pretrained statistics while the weights around it train: batches of strongly augmented
    views would otherwise move them away from what clean images at infer look like
    (docs/models.md). ``backbone`` is a ``rayclust.models.backbones`` spec; ``image_size`` is the
    side the views and infer resize to (the network takes any)."""

    def __init__(self, clusters: int, backbone: str = "effnet-lite0", image_size: int = 128,
                 frozen_stages: int = 0, instance_dim: int = 128, predict_stages: str = "last",
                 pretrained_batchnorm: bool = True):
        super().__init__(predict_stages)
        from rayclust.models.backbones import pretrained_stages

        if not 0 <= frozen_stages < STAGES:
            raise UserError(f"pyramid config: frozen_stages is 0 to {STAGES - 1}, got {frozen_stages}")
        self.clusters = clusters
        self.backbone = pretrained_stages(backbone)
        # where a bare backbone checkpoint's names sit in this model (``--init``; models/__init__.py)
        self.checkpoint_prefix = "backbone." + getattr(self.backbone, "checkpoint_prefix", "")
        self.frozen = self.backbone.first_stages(frozen_stages)  # a plain list: their weights stay the backbone's
        for module in self.frozen:
            module.requires_grad_(False)
        batchnorms = [m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
        self.kept_in_eval = [*self.frozen, *(batchnorms if pretrained_batchnorm else [])]
        self.heads = nn.ModuleList(TwinHeads(w, instance_dim, clusters) for w in self.backbone.widths)
        self.train()  # puts them in eval mode from the start

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's four stage maps, finest first."""
        return self.backbone(images)

    def train(self, mode: bool = True) -> PretrainedPyramid:
        super().train(mode)
        for module in self.kept_in_eval:  # they keep the BatchNorm statistics they were pretrained with
            module.eval()
        return self

    @torch.no_grad()
    def stage_features(self, images: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
        """Each stage's pooled map [N, width] of clean images, in eval mode and in batches."""
        mode, pooled = self.training, []
        self.eval()
        for start in range(0, len(images), batch_size):
            pooled.append([m.mean((2, 3)) for m in self.pyramid(images[start:start + batch_size])])
        self.train(mode)
        return [torch.cat(stage) for stage in zip(*pooled)]

    def warm_start(self, images: torch.Tensor, seed: int, steps: int = WARM_START_STEPS) -> list[torch.Tensor]:
        """Start every stage's cluster head from k-means (``ward_seeded_kmeans``) of that stage's
        pretrained features on a sample of clean images (DEC's initialisation), instead of from
        random weights: the head learns the k-means partition (cross-entropy, ``steps`` Adam steps
        on the pooled features), then contrastive training refines it. A random head needs more
        epochs than a CPU budget gives to catch up with what the pretrained features already
        separate (docs/models.md). Returns each stage's k-means labels of the images."""
        generator, targets = torch.Generator().manual_seed(seed), []
        for heads, features in zip(self.heads, self.stage_features(images)):
            target = torch.from_numpy(ward_seeded_kmeans(F.normalize(features, dim=1).numpy(), self.clusters)).long()
            targets.append(target)
            fit_to_labels(heads.cluster[0], features, target, generator, min(256, len(features)), steps)
        return targets

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's trainable weights (the optimizer may give them a smaller learning rate)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]


def ward_seeded_kmeans(unit: np.ndarray, clusters: int, ward_rows: int = WARD_ROWS) -> np.ndarray:
    """k-means labels of ``unit`` [N, C] started from the centres of Ward's hierarchical clustering
    of at most ``ward_rows`` of its rows, evenly spaced (a sample read shard by shard keeps its
    spread): one deterministic partition. k-means' random starts on pooled pretrained features
    land in partitions 0.1 ACC apart whose inertia does not tell the better ones (docs/models.md,
    *Pretrained pyramid*)."""
    from sklearn.cluster import AgglomerativeClustering, KMeans

    spaced = unit[::-(-len(unit) // ward_rows)]
    ward = AgglomerativeClustering(clusters, linkage="ward").fit_predict(spaced)
    centres = np.stack([spaced[ward == c].mean(0) for c in range(clusters)])
    return KMeans(clusters, init=centres, n_init=1).fit_predict(unit)


def check_shape(image_size: int, depths, widths, heads, kv_reduction, stem_stride: int) -> None:
    """One-line errors for a pyramid config that cannot build."""
    if not all(len(v) == STAGES for v in (depths, widths, heads, kv_reduction)):
        raise UserError(f"pyramid config: depths, widths, heads and kv_reduction need {STAGES} values each")
    if any(w % h for w, h in zip(widths, heads)):
        raise UserError(f"pyramid config: each width must divide by its heads, got {widths} and {heads}")
    sides = [image_size // stem_stride // 2 ** (i + 1) for i in range(STAGES)]
    if any(side < r for side, r in zip(sides, kv_reduction)):
        raise UserError(f"pyramid config: stage maps of {sides} px at image_size {image_size} are smaller "
                        f"than kv_reduction {list(kv_reduction)}")
