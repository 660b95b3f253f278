"""Finished models as the lake keeps them: what a checkpoint is, and loading one for inference.

Library code, apart from the trainer (``rayclust.training`` writes checkpoints; ``labels`` and
``refresh`` only read them), as open_clip keeps ``load_checkpoint`` apart from its training code.
A checkpoint directory holds ``model.pt`` (tensors only, loaded with ``weights_only``) and
``config.json`` (the model config, feature dim, clusters, encoder, run, shards).
"""
from __future__ import annotations

import json

import torch

from rayclust.errors import UserError
from rayclust.lake import MODELS, Lake
from rayclust.models import build_model

CHECKPOINT_FILE = "model.pt"
CONFIG_FILE = "config.json"


def latest_model(lake: Lake) -> dict:
    """The ``LATEST`` pointer: run, checkpoint (relative to the lake), model_version, clusters, metrics."""
    latest = lake.read_json(MODELS, "LATEST")
    if latest is None:
        raise UserError(f"no trained model in {lake.uri}: run jobs/train.py first")
    return latest


def checkpoint_description(lake: Lake, latest: dict) -> dict:
    """The config.json of the checkpoint a LATEST pointer names (model config, clusters, shards, ...)."""
    with lake.fs.open(f"{lake.path(latest['checkpoint'])}/{CONFIG_FILE}", "r") as f:
        return json.load(f)


def load_model(lake: Lake, latest: dict, device: str = "cpu") -> torch.nn.Module:
    """The model a LATEST pointer names, in eval mode. Loads tensors only (weights_only)."""
    directory = lake.path(latest["checkpoint"])
    description = checkpoint_description(lake, latest)
    model = build_model(description["model_config"], description["feature_dim"], description["clusters"])
    with lake.fs.open(f"{directory}/{CHECKPOINT_FILE}", "rb") as f:
        state = torch.load(f, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    return model.to(device).eval()
