"""Finished models as the lake keeps them: what a checkpoint is, and loading one for inference.

Library code, apart from the trainer (``rayclust.train_loop`` writes checkpoints; ``labels`` and
``refresh`` only read them), as open_clip keeps ``load_checkpoint`` apart from its training code.
A checkpoint directory holds ``model.pt`` (tensors only, loaded with ``weights_only``) and
``config.json`` (the model config, feature dim, clusters and how they were chosen, encoder, run, shards). ``LATEST``
records ``model.pt``'s SHA-256: a file damaged inside its tensors still loads, but no longer matches.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from rayclust.errors import UserError
from rayclust.lake import MODELS, Lake
from rayclust.models import build_model, load_tensors

if TYPE_CHECKING:  # loading a model imports torch (build_model); a driver that only points LATEST need not
    import torch

CHECKPOINT_FILE = "model.pt"
CONFIG_FILE = "config.json"
DIGEST = "model_sha256"  # LATEST's record of model.pt


def latest_model(lake: Lake) -> dict:
    """The ``LATEST`` pointer: run, checkpoint (relative to the lake), model_version, clusters, metrics."""
    latest = lake.read_json(MODELS, "LATEST")
    if latest is None and not lake.fs.exists(lake.root):  # a mistyped --lake, not a lake to train in
        raise UserError(f"no lake at {lake.uri}: check --lake (jobs/embed.py makes one, jobs/train.py its model)")
    if latest is None:
        raise UserError(f"no trained model in {lake.uri}: run jobs/train.py first")
    return latest


def checkpoint_description(lake: Lake, latest: dict) -> dict:
    """The config.json of the checkpoint a LATEST pointer names (model config, clusters, shards, ...)."""
    try:
        with lake.fs.open(f"{lake.path(latest['checkpoint'])}/{CONFIG_FILE}", "r") as f:
            return json.load(f)
    except ValueError:  # not UTF-8, or not JSON
        raise UserError(f"{checkpoint_uri(lake, latest, CONFIG_FILE)}: damaged: not JSON") from None


def load_model(lake: Lake, latest: dict, device: str = "cpu") -> torch.nn.Module:
    """The model a LATEST pointer names, in eval mode. Loads tensors only (weights_only); a damaged
    checkpoint, or one that unpickles anything else, is a one-line UserError naming its file."""
    description = checkpoint_description(lake, latest)
    model = build_model(description["model_config"], description["feature_dim"], description["clusters"])
    name = checkpoint_uri(lake, latest, CHECKPOINT_FILE)
    state = load_tensors(model_file(lake, latest), name)
    try:
        model.load_state_dict(state["model"])
    except (TypeError, KeyError, RuntimeError) as exn:
        raise UserError(f"{name}: does not hold the weights of the model its {CONFIG_FILE} describes "
                        f"({type(exn).__name__})") from None
    return model.to(device).eval()


def model_file(lake: Lake, latest: dict) -> bytes:
    """The model.pt of the checkpoint a LATEST pointer names, read whole (so that a store's errors
    are not taken for the file's), checked against the SHA-256 that LATEST recorded, if any."""
    with lake.fs.open(f"{lake.path(latest['checkpoint'])}/{CHECKPOINT_FILE}", "rb") as f:
        data = f.read()
    if DIGEST in latest and hashlib.sha256(data).hexdigest() != latest[DIGEST]:
        raise UserError(f"{checkpoint_uri(lake, latest, CHECKPOINT_FILE)}: damaged: its SHA-256 is not the one "
                        f"LATEST recorded when training wrote it")
    return data


def digest_of(lake: Lake, latest: dict) -> str:
    """The SHA-256 of the model.pt that a LATEST pointer names, for LATEST to record."""
    return hashlib.sha256(model_file(lake, latest)).hexdigest()


def checkpoint_uri(lake: Lake, latest: dict, file: str) -> str:
    """A file of the checkpoint a LATEST pointer names, as the user would spell it."""
    return f"{lake.uri}/{latest['checkpoint']}/{file}"
