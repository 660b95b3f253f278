"""Shared fixtures: one local Ray per test session, and the real data in ../shared."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_SHARDS = SHARED_DATA / "cifar10-test-wds"
CIFAR_FEATURES = SHARED_DATA / "cifar10-test-effnetlite0.npz"
TINY_ENCODER = "open_clip:rayclust-tiny-vit:none"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: starting Ray costs seconds on 2 cores."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar_shards() -> Path:
    if not CIFAR_SHARDS.is_dir():
        pytest.skip(f"real CIFAR-10 shards not found at {CIFAR_SHARDS} (../shared/data beside the checkout)")
    return CIFAR_SHARDS


@pytest.fixture(scope="session")
def cifar_features() -> Path:
    if not CIFAR_FEATURES.is_file():
        pytest.skip(f"real CIFAR-10 features not found at {CIFAR_FEATURES} (../shared/data beside the checkout)")
    return CIFAR_FEATURES
