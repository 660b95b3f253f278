"""rayclust.runtime on a real local Ray, in a process of its own (the local Ray a job starts):
whether the Ray ends with the job, a training job's Ray starting no worker before one is needed, and
what its workers log."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = """
import json, logging, time
import psutil, ray
from rayclust.runtime import AUTOSCALING_REQUESTS_LOGGER, init_ray, ray_ends_with_job

before = ray_ends_with_job()
init_ray(prestart_workers=False)
time.sleep(3)  # what Ray prestarts, it starts at once
raylet = next(p for p in psutil.Process().children(recursive=True) if p.name() == "raylet")
workers = [p for p in raylet.children() if p.cmdline() and p.cmdline()[0].startswith("ray::IDLE")]
level = ray.get(ray.remote(lambda: logging.getLogger(AUTOSCALING_REQUESTS_LOGGER).getEffectiveLevel()).remote())
print(json.dumps({"before": before, "after": ray_ends_with_job(), "idle_workers": len(workers),
                  "autoscaling_requests_log": logging.getLevelName(level)}))
ray.shutdown()
after_shutdown = ray_ends_with_job()
ray.init(num_cpus=1, include_dashboard=False)
init_ray()  # joins a Ray this process started without init_ray, after init_ray's own one ended
print(json.dumps({"after_shutdown": after_shutdown, "joined_later": ray_ends_with_job()}))
"""


@pytest.mark.slow
def test_a_local_ray_without_prestarted_workers_ends_with_the_job():
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    started, stopped = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    # and its workers keep Ray Train's late-autoscaling-answer tracebacks to themselves
    assert started == {"before": False, "after": True, "idle_workers": 0, "autoscaling_requests_log": "ERROR"}
    assert stopped == {"after_shutdown": False, "joined_later": False}


def test_a_ray_this_process_did_not_start_does_not_end_with_it(ray_session):
    from rayclust.runtime import init_ray, ray_ends_with_job

    init_ray()  # joins the Ray already there, as a job's second stage does
    assert ray_session.is_initialized() and not ray_ends_with_job()
