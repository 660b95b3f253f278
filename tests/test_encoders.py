"""Encoders: a random-weights encoder (``:none``) is the same in every process; a pretrained tag whose
weights cannot be loaded is one line before any pipeline starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from rayclust.encoders import load_encoder

from conftest import TINY_ENCODER, job_command

HUB_REPO = "timm/vit_base_patch32_clip_224.openai"  # where open_clip finds ViT-B-32's "openai" weights

FEATURE_OF_ONES = ("import json, torch; from rayclust.encoders import load_encoder; e = load_encoder({spec!r}); "
                   "print(json.dumps(e.forward(torch.ones(1, 3, 32, 32))[0, :4].tolist()))")


def test_random_weights_encoder_maps_an_image_alike_in_another_process():
    """Embed and a later refresh run in different processes: with different random weights, the
    model trained on embed's features would label refresh's at random (seen as 'drift' at once)."""
    here = load_encoder(TINY_ENCODER)
    torch.manual_seed(123)  # the caller's seed does not matter either
    again = load_encoder(TINY_ENCODER)
    with torch.no_grad():
        image = torch.ones(1, 3, 32, 32)
        assert torch.equal(here.forward(image), again.forward(image))
        expected = here.forward(image)[0, :4].tolist()
    other = subprocess.run([sys.executable, "-c", FEATURE_OF_ONES.format(spec=TINY_ENCODER)],
                           capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(other.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)


def offline_env(cache) -> dict[str, str]:
    """No hub (as on a machine without internet, whatever this one has) and an empty or given cache;
    an address that fails if the job got as far as joining Ray."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
            "RAY_ADDRESS": "the-encoder-check-must-come-before-ray"}


def test_unloadable_weights_are_one_line_before_the_pipeline(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(b"")
    started = time.time()
    run = subprocess.run(job_command("embed.py", "--shards", str(shard), "--lake", str(tmp_path / "lake")),
                         env=offline_env(tmp_path / "hub-cache"), capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1, run.stderr  # the README's embed example: the default encoder
    assert "open_clip:ViT-B-32:openai" in lines[0] and "--encoder effnet-lite0" in lines[0], lines[0]
    assert time.time() - started < 60, "the check must not wait on downloads"
    assert not (tmp_path / "lake").exists()


def test_weights_in_the_local_cache_pass_the_check_offline(tmp_path):
    """The Hugging Face cache layout (refs/main -> snapshots/<revision>/<file>), as a download leaves it."""
    model = tmp_path / "hub-cache" / f"models--{HUB_REPO.replace('/', '--')}"
    (model / "refs").mkdir(parents=True)
    (model / "refs" / "main").write_text("0" * 40)
    (model / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (model / "snapshots" / ("0" * 40) / "open_clip_model.safetensors").write_bytes(b"weights")
    check = ("from rayclust.encoders import check_weights_reachable; "
             "check_weights_reachable('open_clip:ViT-B-32:openai')")
    run = subprocess.run([sys.executable, "-c", check], env=offline_env(tmp_path / "hub-cache"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
