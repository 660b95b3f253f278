"""Ray start-up and the resource arithmetic that keeps jobs from starving each other."""
from __future__ import annotations

import logging
import os

import ray


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``), else start a local Ray."""
    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING, log_to_driver=True)


def cluster_cpus() -> float:
    return ray.cluster_resources().get("CPU", 0.0)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def encoder_actor_count() -> int:
    """One actor per GPU; on CPU, leave a quarter of the CPUs (at least one) to read and decode."""
    if cluster_gpus():
        return cluster_gpus()
    cpus = int(cluster_cpus())
    return max(1, cpus - max(1, cpus // 4))
