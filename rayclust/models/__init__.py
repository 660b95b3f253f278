"""Clustering models; each one's hyper-parameters live as JSON in ``rayclust/model_configs/``."""
from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by build_model's callers; listing models (train.py --help) stays fast
    import torch

from rayclust.errors import UserError

MODEL_CONFIGS = Path(__file__).parent.parent / "model_configs"
MODEL_CLASSES = {"ccmlp": "rayclust.models.ccmlp:CCMLP", "mfavb": "rayclust.models.mfavb:MFAVB",
                 "pyramid": "rayclust.models.pyramid:Pyramid",
                 "pretrained-pyramid": "rayclust.models.pyramid:PretrainedPyramid",
                 "temi": "rayclust.models.temi:TEMI"}
TRAINING_KEYS = (  # the recipe, not the network
    "lr", "backbone_lr", "weight_decay", "neighbours", "epochs", "min_steps", "batch_size", "self_label_epochs",
    "self_label_threshold", "warm_start_images", "warm_start_rows", "warm_start_clusters",
)


def available_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))


def model_config(name: str, **overrides) -> dict:
    path = MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        raise UserError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return {**json.loads(path.read_text()), **overrides}


def is_image_model(config: dict) -> bool:
    """Image models (``"input": "images"``) train on shards' pixels; the rest on the feature table."""
    return config.get("input", "features") == "images"


def build_model(config: dict, feature_dim: int, clusters: int) -> torch.nn.Module:
    """The model a config names, for ``feature_dim``-wide inputs and ``clusters`` clusters.

    An image model ignores ``feature_dim``: its config's ``image_size`` sets its input.
    """
    module, name = MODEL_CLASSES[config["model"]].split(":")
    builder = getattr(importlib.import_module(module), name)  # only its own imports: timm costs seconds a process
    if is_image_model(config):
        return builder(clusters=clusters, **_hyper(config))
    return builder(feature_dim=feature_dim, clusters=clusters, **_hyper(config))


def parameter_groups(model: torch.nn.Module, config: dict) -> list[dict]:
    """The optimizer's parameter groups: a pretrained backbone's trainable weights at the config's
    ``backbone_lr`` (when both exist), every other trainable weight at its ``lr``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if "backbone_lr" not in config or not hasattr(model, "backbone_parameters"):
        return [{"params": trainable}]
    backbone = {id(p) for p in model.backbone_parameters()}
    return [{"params": [p for p in trainable if id(p) in backbone], "lr": config["backbone_lr"]},
            {"params": [p for p in trainable if id(p) not in backbone]}]


def _hyper(config: dict) -> dict:
    """The config minus the keys that are not the model's constructor arguments."""
    return {k: v for k, v in config.items() if k not in ("model", "input", *TRAINING_KEYS)}


CHECKPOINT_WRAPPERS = ("model", "state_dict", "model_state_dict")


def pretrained_state(path: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint that match ``model``'s by name and shape; prints how many.

    Reads ``.safetensors``, or a PyTorch file with tensors only (``weights_only``): a bare state
    dict or one under "model"/"state_dict" (timm, rayclust), with DDP's "module." prefix removed.
    A checkpoint of a pretrained pyramid's backbone alone matches under the model's
    ``checkpoint_prefix``.
    """
    import torch

    if not os.path.isfile(path):
        raise UserError(f"--init checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as exn:  # a damaged file fails in many ways; all mean "not usable"
            raise UserError(f"--init {path}: not a safetensors file of tensors ({first_line(exn)})") from None
    else:
        state = load_tensors(path, f"--init {path}")
    for key in CHECKPOINT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"--init {path}: not a state dict")
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    prefix = getattr(model, "checkpoint_prefix", "")
    if prefix and not any(k in own for k in state):  # the backbone's own checkpoint (timm's), not a rayclust one
        state = {prefix + k: v for k, v in state.items()}
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(v.dim() for v in matched.values()):  # BN's scalar counters alone match any BN model
        raise UserError(f"--init {path}: none of its {len(state)} tensors matches the model's names and shapes")
    print(f"--init {path}: {len(matched)} of the model's {len(own)} tensors loaded, "
          f"{len(state) - len(matched)} of the checkpoint's unused", flush=True)
    return matched


def load_tensors(source: str | bytes, name: str) -> Any:
    """The content of a PyTorch file (a path, or its bytes) made of tensors and plain containers
    only (``weights_only``). Anything else is a UserError that starts with ``name``: a file that
    would unpickle other Python objects is refused, never run, and so is a damaged one."""
    import torch

    try:
        with warnings.catch_warnings():  # a newer pickle protocol is warned about in lines around the one error
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                              weights_only=True)
    except pickle.UnpicklingError:  # torch's refusal of a global, or a pickle stream it cannot follow
        raise UserError(f"{name}: refused: not a checkpoint of tensors alone (it holds other Python objects, "
                        f"which are never unpickled, or it is damaged)") from None
    except Exception as exn:  # a damaged file fails in many ways: zip, EOF, decoding, missing records
        raise UserError(f"{name}: damaged: not a checkpoint of tensors ({first_line(exn)})") from None


def first_line(exn: BaseException) -> str:
    """An error's type and the first sentence of its message, for a one-line report."""
    lines = str(exn).strip().splitlines()
    message = lines[0].split(". ")[0] if lines else ""
    return f"{type(exn).__name__}: {message}" if message else type(exn).__name__
