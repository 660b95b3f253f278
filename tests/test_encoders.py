"""Encoders: a random-weights encoder (``:none``) is the same in every process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rayclust.encoders import load_encoder

from conftest import TINY_ENCODER

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
