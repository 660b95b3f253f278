"""Clustering models; each one's hyper-parameters live as JSON in ``rayclust/model_configs/``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by build_model's callers; listing models (train.py --help) stays fast
    import torch

from rayclust.errors import UserError

MODEL_CONFIGS = Path(__file__).parent.parent / "model_configs"


def available_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))


def model_config(name: str, **overrides) -> dict:
    path = MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        raise UserError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return {**json.loads(path.read_text()), **overrides}


def build_model(config: dict, feature_dim: int, clusters: int) -> torch.nn.Module:
    """The model a config names, for ``feature_dim``-wide inputs and ``clusters`` clusters."""
    from rayclust.models.mfavb import MFAVB

    builders = {"mfavb": MFAVB}
    return builders[config["model"]](feature_dim=feature_dim, clusters=clusters, **_hyper(config))


def _hyper(config: dict) -> dict:
    """The config minus the keys that are not the model's constructor arguments."""
    return {k: v for k, v in config.items() if k not in ("model", "lr", "weight_decay")}
