"""One adapter from a stage to a Ray Data operator: every stage declares what it runs and on what.

A stage is a function (run in Ray tasks) or a class (run in an actor pool, built once per actor),
with the resources one task or actor needs. ``apply`` is the only place that calls
``map_batches``, so every pipeline (embed, infer, refresh, the image model's views) schedules its
stages the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.data import ActorPoolStrategy


@dataclass(frozen=True)
class Stage:
    fn: Callable | type
    batch_size: int | None = None  # None: each block as it comes
    batch_format: str = "pyarrow"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes, for the scheduler; also keeps two CPU stages from fusing
    actors: tuple[int, int | None] = (1, None)  # class stages: pool size from..to (None: as the cluster grows)
    kwargs: dict[str, Any] = field(default_factory=dict)  # the function's, or the class constructor's


def apply(dataset: ray.data.Dataset, stage: Stage) -> ray.data.Dataset:
    options: dict[str, Any] = {"batch_size": stage.batch_size, "batch_format": stage.batch_format,
                               "num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus}
    if stage.memory:
        options["memory"] = stage.memory
    if isinstance(stage.fn, type):
        low, high = stage.actors
        options.update(compute=ActorPoolStrategy(min_size=low, max_size=high),
                       fn_constructor_kwargs=stage.kwargs)
    else:
        options["fn_kwargs"] = stage.kwargs
    return dataset.map_batches(stage.fn, **options)


def run(dataset: ray.data.Dataset, *stages: Stage) -> ray.data.Dataset:
    for stage in stages:
        dataset = apply(dataset, stage)
    return dataset
