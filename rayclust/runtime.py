"""Ray start-up, where a job's files must live, and how many actors each stage gets."""
from __future__ import annotations

import logging
import os
import re
import socket
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

import ray
from ray.data import DataContext
from ray.util.debug import log_once

from rayclust.cli import VERBOSE_ENV
from rayclust.errors import UserError
from rayclust.lake import store_unreachable

LABELER_GPU_SHARE = 0.25  # a small MLP: four labelers share a GPU
LABELER_CPUS = 0.25
WRITE_CPUS = 0.25  # staging pieces waits on the store
DECODE_CPUS = 0.5  # PIL work with waits on I/O between images: two tasks per core keep it busy
# Ray kills idle workers beyond one per CPU after 1 s. The fractional-CPU stages above keep more
# workers than CPUs busy in turns, so each pause killed one and the next task started a new one
# (importing torch, ~3 s of CPU): embed of 100 shards spent 105 of its CPU-seconds on that.
WORKER_IDLE_KILL_MS = "60000"
JOIN_TIMEOUT_S = 10
AUTOSCALING_REQUESTS_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
_local_ray_node: str | None = None  # the node of the local Ray init_ray started, if it did


def init_ray(prestart_workers: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS (as under ``ray job submit``), else start a local Ray
    without the dashboard: it is ten processes (about 0.8 GB of resident memory) and seconds of
    start-up, for a page that goes when the job ends; a cluster started with ``ray start`` has
    one (cluster-configs/). A local Ray starts one worker per CPU for the driver's tasks before
    any is asked for; without ``prestart_workers`` it starts workers only as tasks and actors need
    them (a training job's actors each get a process of their own: those would idle through it)."""
    global _local_ray_node
    leave_retries_to_the_store_clients()
    hide_store_outage_tracebacks()
    verbose = ray_logs_wanted()
    if not verbose:
        quiet_ray_data()
    if ray.is_initialized():
        return
    keep_idle_workers()
    address, local_options = os.environ.get("RAY_ADDRESS"), {}
    if address:
        check_answers(address)
    else:
        quiet_token_auth_notice()
        no_preemption_watcher()
        if not prestart_workers:
            os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        if not verbose:
            os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # its workers inherit it: see quiet_ray_data
        local_options["include_dashboard"] = False
        local_options["runtime_env"] = {"worker_process_setup_hook": set_up_local_worker}
    try:
        ray.init(address=address, logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=True,
                 **local_options)
    except Exception as exn:
        if not address:  # e.g. a raylet that did not register within Ray's 30 s on an overloaded machine
            raise UserError(f"could not start a local Ray (RAY_ADDRESS joins a running cluster instead): "
                            f"{type(exn).__name__}: {first_cause(exn)}") from None
        if isinstance(exn, ConnectionError):  # e.g. a cluster with token authentication, and no token here
            raise UserError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {first_cause(exn)}") from None
        raise
    _local_ray_node = None if address else ray.get_runtime_context().get_node_id()


def ray_ends_with_job() -> bool:
    """Whether this process is connected to the local Ray that ``init_ray`` started: it stops when
    the process ends, and everything on it with it. (Not to a Ray joined after that one was shut down.)"""
    return ray.is_initialized() and ray.get_runtime_context().get_node_id() == _local_ray_node


def first_cause(exn: BaseException) -> str:
    """The reason at the bottom of Ray's wrapping: the last line of the first exception in the
    chain, whose message quotes the traceback of the error it caught."""
    while exn.__cause__ is not None:
        exn = exn.__cause__
    return str(exn).strip().splitlines()[-1]


def check_answers(address: str) -> None:
    """One line instead of a hang: ``ray.init`` waits for ever on an address where no Ray listens."""
    host_port = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address)
    if host_port is None:  # "auto", or a form Ray will judge itself
        return
    try:
        socket.create_connection((host_port[1], int(host_port[2])), timeout=JOIN_TIMEOUT_S).close()
    except OSError as exn:
        raise UserError(f"no Ray cluster answers at RAY_ADDRESS={address} ({exn.strerror or exn})") from None


def leave_retries_to_the_store_clients() -> None:
    """Ray Data would retry a read that failed with an S3 error up to 10 more times, backing off up
    to 32 s, on top of the S3 client's own retries (``rayclust.lake``): a store that stays down
    would hold a job for some ten minutes. One layer retries: the client's."""
    DataContext.get_current().retried_io_errors = []


class HideStoreOutageTraceback(logging.Filter):
    """Drops, from the terminal, what Ray Data logs of a failure because the object store stopped
    answering (tracebacks, and a plea to report a Ray bug): the job reports it in one line
    (``rayclust.cli.run_job``). Ray Data's log file keeps them. Ray Data logs some of these
    records without the exception, from inside the handler that is dealing with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exn = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exn is None or not store_unreachable(exn)


HIDE_STORE_OUTAGES = HideStoreOutageTraceback()


def hide_store_outage_tracebacks() -> None:
    """On the driver: ``HideStoreOutageTraceback`` on the console handlers of Ray Data's logger
    (once: a handler does not add a filter it has)."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.addFilter(HIDE_STORE_OUTAGES)


def quiet_ray_data() -> None:
    """On the driver, without --verbose: no Ray Data progress bars (they are drawn per dataset,
    i.e. per epoch of an image model's training), and its INFO records (each execution's start,
    plan and end, and a block of progress every 10 s where stdout is not a terminal) kept to its
    log file; the jobs print a progress line of their own (``rayclust.progress``). Ray Data
    configures its logger again in each worker that runs a dataset, from ``RAY_DATA_LOG_LEVEL``:
    a local Ray's workers inherit that from ``init_ray``; on a cluster, set it in the environment of
    ``ray start`` (cluster-configs/) to quiet an image model's training."""
    DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data's warning that they are off: taken here, once
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def ray_logs_wanted() -> bool:
    """``--verbose`` (the job sets VERBOSE_ENV; a local Ray's workers inherit it)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def set_up_local_worker() -> None:
    """In each worker of a local Ray. Ray's State API client (Ray Data's hang detector asks it about
    slow tasks) finds the cluster by looking for Ray's processes on the machine: with another local
    Ray beside this one (a second job) it gives up with a traceback, so each worker names its own."""
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    quiet_ray_data_workers()
    if not ray_logs_wanted():
        quiet_autoscaling_requests()


def quiet_ray_data_workers() -> None:
    """In each worker of a local Ray, for an image model's training (Ray Train streams its views):
    Ray Train's dataset manager sets an execution option that Ray Data itself deprecates (a
    warning about Ray's code, not the user's), and the split coordinator says once that progress
    bars are off, which the job turned off on purpose (``quiet_ray_data``)."""
    warnings.filterwarnings("ignore", message=".*exclude_resources.* is deprecated", category=DeprecationWarning)
    log_once("ray_data_progress_manager_disabled")


def quiet_autoscaling_requests() -> None:
    """In each worker of a local Ray. Ray Train's controller registers a run's resources with its
    autoscaling coordinator (an actor) and waits 5 s for the answer; on a machine whose cores the
    job's own work keeps busy the answer can be late, and the controller logs a traceback that Ray
    itself calls safe to ignore. A local Ray has no autoscaler to ask."""
    logging.getLogger(AUTOSCALING_REQUESTS_LOGGER).setLevel(logging.ERROR)


def quiet_token_auth_notice() -> None:
    """Ray 2.60 starts a local Ray with token authentication and logs a WARNING saying so on every
    run: the default, not a problem. (Joining a cluster, Ray's warning that the cluster has no
    token authentication stays: that one is the operator's to hear.)"""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def no_preemption_watcher() -> None:
    """Set before a local Ray starts (its processes inherit it). Ray Train's PreemptionWatcher
    follows nodes that an autoscaler drains; a local Ray is one machine nobody drains, so the
    watcher would be one more process (~190 MB) with nothing to watch, and its start logs a
    core_worker error line in every train job."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def keep_idle_workers() -> None:
    """Set before a local Ray starts (its raylet reads it); a cluster's nodes get it from the
    environment of `ray start` (cluster-configs/)."""
    os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", WORKER_IDLE_KILL_MS)


def cluster_cpus() -> float:
    return ray.cluster_resources().get("CPU", 0.0)


@contextmanager
def task_shuffles() -> Iterator[None]:
    """Ray Data groupbys started inside shuffle with tasks (pull-based sort: map and reduce tasks on
    the workers Ray keeps) instead of the hash shuffle's aggregator actors, each a process to
    start. On the demo's lake: the near-duplicate pass 13.5-18.5 s -> 5.6-6.0 s."""
    from ray.data.context import ShuffleStrategy

    context = DataContext.get_current()
    before = context.shuffle_strategy
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        context.shuffle_strategy = before


def shuffle_partitions(groups: int) -> int:
    """Partitions for a Ray Data groupby of ``groups`` groups: two per CPU at most, never more than
    groups. Ray Data's default (200, each with its aggregator) costs a small cluster more to start
    than the data costs to move."""
    return max(1, min(groups, 2 * int(cluster_cpus()) or 1))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def largest_node_cpus() -> float:
    return max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")), default=0.0)


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared(uri: str, what: str) -> None:
    """Refuse a local path that workers on other nodes cannot see (call after ``init_ray``)."""
    if "://" in uri and not uri.startswith("file://"):
        return
    nodes = alive_nodes()
    if nodes > 1:
        raise UserError(f"{what} {uri} is a local folder but the Ray cluster has {nodes} nodes, whose workers "
                        f"cannot see this machine's disk: use an s3:// {what}")


def encoder_actor_count() -> int:
    """One actor per GPU; on CPU, leave a quarter of the CPUs (at least one) to read and decode."""
    if cluster_gpus():
        return cluster_gpus()
    cpus = int(cluster_cpus())
    return max(1, cpus - max(1, cpus // 4))


def encoder_pool() -> tuple[int, int | None]:
    """GPU: one actor per GPU now, growing as the autoscaler adds GPUs. CPU: a fixed pool that
    leaves CPUs to the decoding tasks."""
    if cluster_gpus():
        return 1, None
    return encoder_actor_count(), encoder_actor_count()


def labeler_gpus() -> float:
    return LABELER_GPU_SHARE if cluster_gpus() else 0.0


def labeler_pool() -> tuple[int, int | None]:
    """From one actor, growing while batches queue up: as many as encoders on CPU (a quarter CPU
    each: whole CPUs beside the encoders stalled refresh's decoding), four per GPU on GPU."""
    if cluster_gpus():
        return 1, None
    return 1, encoder_actor_count()
