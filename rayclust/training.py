"""Features (or images) become a model: Ray Train (TorchTrainer, DDP) trains a contrastive-clustering model.

Workers stream the feature table's files themselves, in a new seeded order every epoch
(``rayclust.train_data``), with each row's nearest rows mined once per table
(``rayclust.neighbours``); an image model (``"input": "images"``) streams weak and strong views
of the shards' images instead, made afresh every epoch by Ray Data CPU tasks (``rayclust.views``,
through ``get_dataset_shard``);
checkpoints go to ``LAKE/models/<run>/`` through ``ray.train.report``; ``LATEST`` is
written only once training has finished and its last checkpoint is complete. Running
again with the same ``run`` name resumes from that run's last checkpoint; so does a run whose
worker dies (Ray Train's ``FailureConfig``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rayclust.cli import ClusterRange
from rayclust.errors import UserError
from rayclust.health import ClusterHealth, health_of
from rayclust.lake import FEATURES, MODELS, Lake, list_to_numpy, read_sample
from rayclust.losses import (SELF_LABEL_THRESHOLD, contrastive_clustering_loss, global_mean, per_cluster_head,
                             pmi_loss, self_labelling_loss)
from rayclust.models import (build_model, is_image_model, load_tensors, model_config, parameter_groups,
                             pretrained_state)
from rayclust.models.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, DIGEST, digest_of, load_model
from rayclust.models.heads import REFILL_ROWS, ClusterHeads, CoAssignments
from rayclust.neighbours import Neighbours, TableRows, neighbour_store, table_rows
from rayclust.progress import duration
from rayclust.runtime import cluster_cpus, cluster_gpus, init_ray, largest_node_cpus
from rayclust.shards import ROWS_PER_BLOCK, count_images, expand_shards, read_shards
from rayclust.train_data import feature_batches, least_rows_per_worker

if TYPE_CHECKING:
    from rayclust.choose_k import KChoice
    from rayclust.evaluation import QualityReport

# A default batch too large for the table is lowered to give each epoch this many full steps:
# one or two steps an epoch leave the optimizer too few updates to learn from a small corpus.
MIN_STEPS_PER_EPOCH = 4
# ... but the global batch keeps this many samples per cluster: the cluster loss contrasts the K
# clusters' assignment vectors over the batch and maximises the entropy of their sizes, which
# with fewer samples than clusters cannot even give every cluster one. A default batch below it
# is raised to it (K = 1,000: 512 -> 2,000 left 1 cluster of 1,000 empty per head instead of 19,
# benchmarks/large_k.py); a table with fewer rows than this is refused: it cannot make one such batch.
MIN_BATCH_PER_CLUSTER = 2
# A worker that dies (killed, out of memory, its node lost) restarts the run from its last
# checkpoint, this many times per run; a failure that repeats after that many restarts is one that
# restarting does not fix. Preemptions have a budget of their own (FailureConfig's default).
MAX_WORKER_FAILURES = 3


@dataclass
class TrainSettings:
    lake: str
    model: str = "ccmlp"  # the best on the quality benchmark (BENCHMARKS.md)
    clusters: int | ClusterRange = 10  # a range: K is chosen from it on a sample of the features (choose_k)
    epochs: int | None = None  # contrastive epochs; None: the model config's
    batch_size: int | None = None  # None: the model config's
    workers: int | None = None
    run: str | None = None
    seed: int = 0
    shards: str | None = None  # image models: the shard pattern to train on
    init: str | None = None  # a local checkpoint to start from (tensors matched by name and shape)
    overrides: dict = field(default_factory=dict)  # model config values replacing the JSON's
    evaluate: bool = True  # print ACC/NMI/ARI against k-means when the features carry labels
    self_label_epochs: int | None = None  # after the contrastive ones; None: the model config's (0 if it has none)
    clusters_chosen: KChoice | None = None  # how ``clusters`` was chosen, when it was


@dataclass
class WorkerPlan:
    workers: int
    use_gpu: bool
    cpus_per_worker: float

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))


def plan_workers(requested: int | None) -> WorkerPlan:
    """One worker per GPU; on CPU, workers share all CPUs but one, which Ray Data keeps for reading
    (asking for every CPU would wait forever while an actor of an earlier stage still holds one),
    and no worker asks for more CPUs than the largest node has (a worker runs on one node)."""
    gpus = cluster_gpus()
    if gpus:
        return WorkerPlan(requested or gpus, True, 1.0)
    workers = requested or 1
    spare = max(cluster_cpus() - 1, 0.5)
    return WorkerPlan(workers, False, round(min(spare / workers, spare, largest_node_cpus()), 2))


@dataclass(frozen=True)
class FeatureTable:
    """What training needs to know of the feature table, from one listing, one row and the footers."""

    files: dict[str, str]  # shard -> path
    layout: TableRows
    views: int
    encoder: str


def feature_table(lake: Lake) -> FeatureTable:
    files = lake.newest_files(FEATURES)
    if not files and not lake.fs.exists(lake.root):  # a mistyped --lake
        raise UserError(f"no lake at {lake.uri}: check --lake (jobs/embed.py makes one)")
    if not files:
        raise UserError(f"no features in {lake.uri}: run jobs/embed.py first")
    row = read_sample(lake, files, ["embedding", "views", "encoder"], 1)
    return FeatureTable(files, table_rows(lake, files, len(row.column("embedding")[0])), len(row.column("views")[0]),
                        row.column("encoder")[0].as_py())


def fit_batch_size(batch_size: int, explicit: bool, rows: tuple[int, ...], workers: int, clusters: int) -> int:
    """The per-worker batch for a feature table of files of ``rows`` rows, which each epoch deals
    whole to ``workers`` (``least_rows_per_worker``), each dropping its last partial batch. An
    ``explicit`` batch is kept if it fits at all; a default one is raised to MIN_BATCH_PER_CLUSTER
    samples per cluster in the global batch, and one too large for MIN_STEPS_PER_EPOCH steps is
    lowered, not below that (nor above a worker's rows)."""
    least, total = MIN_BATCH_PER_CLUSTER * clusters, sum(rows)
    if total < least:
        raise UserError(f"the feature table has {total} rows, too few for {clusters} clusters "
                        f"(at least {least}): lower --clusters")
    if len(rows) < workers:
        raise UserError(f"the feature table has {len(rows)} file(s) for {workers} workers, and each worker reads "
                        f"whole files: lower --workers to {len(rows)}")
    per_worker = least_rows_per_worker(rows, workers)
    if per_worker == 0 or (explicit and batch_size > per_worker):
        raise UserError(f"no full batch of {batch_size} samples per worker (the feature table's {len(rows)} files "
                        f"give each of {workers} worker(s) at least {per_worker} rows): "
                        "lower --batch-size or --workers")
    if explicit:
        return batch_size
    per_cluster = -(-least // workers)
    return min(max(batch_size, per_cluster), per_worker, max(per_worker // MIN_STEPS_PER_EPOCH, per_cluster))


def check_pairs(views: int, model: str, config: dict) -> None:
    """A feature model pairs each row with one of its augmented views or, when its config has
    ``neighbours``, with a neighbour's clean row: a table embedded with ``--views 0`` needs the latter."""
    if views == 0 and not config.get("neighbours", 0):
        raise UserError(f"--model {model} pairs each row with its augmented views, but the feature table has none "
                        f"(embedded with --views 0): re-embed with --views 1 or more, or train a model with neighbours")


def image_training_dataset(uris: list[str], image_size: int) -> ray.data.Dataset:
    """Weak and strong views of the shards' decodable images, streamed and re-augmented every epoch."""
    from rayclust.views import training_views  # torchvision: seconds to import on every Ray Train worker otherwise

    return read_shards(uris).map_batches(training_views, fn_kwargs={"image_size": image_size},
                                         batch_size=ROWS_PER_BLOCK, batch_format="pyarrow")


def training_shards(settings: TrainSettings, images: bool) -> list[str]:
    """The shard URIs an image model trains on ([] for a feature model); one-line errors for a wrong input."""
    if images and not settings.shards:
        raise UserError(f"--model {settings.model} trains on images: give --shards")
    if not images and settings.shards:
        raise UserError(f"--model {settings.model} trains on the lake's features, not on --shards: "
                        f"run jobs/embed.py on the shards, then train without --shards")
    return expand_shards(settings.shards) if images else []


def absolute_pattern(pattern: str) -> str:
    """A local shard pattern made absolute, so infer finds the shards from any directory."""
    return pattern if "://" in pattern else os.path.abspath(pattern)


def train(settings: TrainSettings) -> dict:
    """Train on ``LAKE/features/`` (an image model: on the images of ``settings.shards``) and
    point ``LAKE/models/LATEST`` at the result."""
    lake = Lake.open(settings.lake)
    config = model_config(settings.model, **settings.overrides)
    images = is_image_model(config)
    uris = training_shards(settings, images)
    table = None if images else feature_table(lake)
    settings = with_chosen_clusters(settings, lake, table)
    if settings.clusters < 2:
        raise UserError("--clusters must be at least 2")
    self_label_epochs = config.get("self_label_epochs", 0) if settings.self_label_epochs is None \
        else settings.self_label_epochs
    if images and self_label_epochs:
        raise UserError(f"--model {settings.model} trains on images: self-labelling is for feature models")
    if config["model"] == "temi" and self_label_epochs:
        raise UserError(f"--model {settings.model} labels with its EMA teacher and has no self-labelling epochs: "
                        "drop --self-label-epochs")
    if table is None:
        dim, rows = config["image_size"], None  # counting images would read every shard
    else:
        check_pairs(table.views, settings.model, config)
        dim, rows = table.layout.dim, table.layout.rows
    init = pretrained_state(settings.init, build_model(config, dim, settings.clusters)) if settings.init else None
    init_ray()
    run = settings.run or f"{settings.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_resume_checkpoint(lake, run)
    plan = plan_workers(settings.workers)
    batch_size = training_batch_size(settings, config, rows, plan.workers)
    if images:
        check_enough_images(uris, batch_size, plan.workers)
    neighbours = feature_neighbours(lake, table, config.get("neighbours", 0)) if table is not None else None
    loop_config = {
        "model_config": config, "feature_dim": dim, "clusters": settings.clusters,
        "epochs": settings.epochs or config["epochs"], "self_label_epochs": self_label_epochs,
        "batch_size": batch_size,
        "seed": settings.seed, "threads": plan.threads, "run": run,
        "lake": lake.uri, "table": None if table is None else table.layout, "neighbours": neighbours,
        "encoder": None if table is None else table.encoder,
        "shards": absolute_pattern(settings.shards) if images else None,
        "init": settings.init, "init_weights": ray.put(init) if init else None,
        "clusters_chosen": settings.clusters_chosen.as_json() if settings.clusters_chosen else None,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=plan.workers, use_gpu=plan.use_gpu, resources_per_worker={"CPU": plan.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run, storage_path=lake.path(MODELS), storage_filesystem=lake.arrow_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
            # Ray Train's controller logs a failure's traceback at INFO before fit() raises it with the same
            # traceback (or, for a UserError, before run_job prints it as one line): keep it off the terminal
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": image_training_dataset(uris, dim)} if table is None else None,
    )
    print(f"training {settings.model} run {run}: {plan.workers} worker(s), "
          f"{'GPU' if plan.use_gpu else f'{plan.cpus_per_worker} CPU each'}", flush=True)
    # Ray Train's workers send each print through a logger and to stdout: every epoch line twice.
    # Ray Train hands this variable from the driver to the controller and its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    result = trainer.fit()
    latest = publish_latest(lake, run, result.checkpoint.path, result.metrics, settings.clusters)
    print(f"model {latest['model_version']} written; LATEST -> {latest['checkpoint']}", flush=True)
    if table is not None:  # image models: jobs/infer.py measures
        print(evaluate_checkpoint(lake, latest, table.files, settings.evaluate), flush=True)
    return latest


def with_chosen_clusters(settings: TrainSettings, lake: Lake, table: FeatureTable | None) -> TrainSettings:
    """``settings`` with a range of K replaced by the K chosen on the first CHOICE_ROWS clean embeddings
    of the feature table (``rayclust.choose_k``), and how it was chosen; an integer K as it is."""
    if not isinstance(settings.clusters, ClusterRange):
        return settings
    if table is None:
        raise UserError(f"--model {settings.model} trains on images: choosing K needs a feature table; "
                        "give --clusters K")
    from rayclust.choose_k import CHOICE_ROWS, CRITERION, choose_clusters  # scikit-learn: only the driver chooses

    sample = read_sample(lake, table.files, ["embedding"], CHOICE_ROWS)
    print(f"choosing K from {settings.clusters} by {CRITERION} on {sample.num_rows:,} rows", flush=True)
    choice = choose_clusters(list_to_numpy(sample.column("embedding"), table.layout.dim), settings.clusters,
                             settings.seed)
    print(choice, flush=True)
    return dataclasses.replace(settings, clusters=choice.chosen, clusters_chosen=choice)


def feature_neighbours(lake: Lake, table: FeatureTable, k: int):
    """The table's clean embeddings and each row's k nearest rows in the object store, mined
    once per table (``rayclust.neighbours``); None for a model without neighbours."""
    if not k:
        return None
    store, mined = neighbour_store(lake, table.layout, k, cpus=max(1, int(largest_node_cpus())))
    print(mined, flush=True)
    return store


def training_batch_size(settings: TrainSettings, config: dict, rows: tuple[int, ...] | None, workers: int) -> int:
    """The per-worker batch: the settings' or the model config's, fitted to a feature table whose
    files hold ``rows`` rows (``fit_batch_size``). An image model's samples are not counted (that
    would read every shard); ``check_enough_images`` reads only as many as one batch per worker needs."""
    requested = settings.batch_size or config["batch_size"]
    if rows is None:
        return requested
    fitted = fit_batch_size(requested, settings.batch_size is not None, rows, workers, settings.clusters)
    if fitted > requested:
        print(f"batch size {requested} -> {fitted} per worker: {MIN_BATCH_PER_CLUSTER} samples per cluster "
              f"for {settings.clusters} clusters over {workers} worker(s)", flush=True)
    elif fitted < requested:
        print(f"batch size {requested} -> {fitted} per worker: the feature table has {sum(rows)} rows "
              f"for {workers} worker(s)", flush=True)
    return fitted


def check_enough_images(uris: list[str], batch_size: int, workers: int) -> None:
    """Enough samples for a full batch on every worker, or a one-line error before Ray Train starts
    (on the workers it would be a failure that every restart repeats)."""
    needed = batch_size * workers
    if (found := count_images(uris, needed)) < needed:
        raise UserError(f"no full batch of {batch_size} samples per worker: the shards hold {found} images for "
                        f"{workers} worker(s); lower --batch-size or --workers")


def publish_latest(lake: Lake, run: str, checkpoint_path: str, metrics: dict, clusters: int) -> dict:
    """Point ``LATEST`` at a finished run's checkpoint, only once that checkpoint loads: one cut
    short or damaged leaves LATEST where it was."""
    relative = checkpoint_path[len(lake.root):].lstrip("/")
    latest = {
        "run": run,
        "checkpoint": relative,
        "model_version": f"{run}/epoch-{metrics['epoch']}",
        "clusters": clusters,
        "metrics": metrics,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        load_model(lake, latest)
    except UserError as exn:
        raise UserError(f"{exn}; LATEST unchanged") from None
    latest[DIGEST] = digest_of(lake, latest)
    lake.write_json(latest, MODELS, "LATEST")
    return latest


class QuietTrainConsole(logging.Filter):
    """What a worker's Ray Train logger may print on the terminal: warnings and errors (Ray 2.60's
    workers print its INFO records, "Reporting training result ...", whatever LoggingConfig says),
    but not the traceback of a training function that ended in a UserError: the job reports that as
    one line (``rayclust.cli.run_job``). Worker log files keep everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        last_line = record.getMessage().rstrip().rsplit("\n", 1)[-1]
        return record.levelno >= logging.WARNING and \
            not last_line.startswith(f"{UserError.__module__}.{UserError.__qualname__}:")


def quiet_train_console() -> None:
    """On a Ray Train worker: ``QuietTrainConsole`` on the console handlers of Ray Train's logger."""
    for handler in logging.getLogger("ray.train").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.addFilter(QuietTrainConsole())


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    quiet_train_console()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    model = build_model(config["model_config"], config["feature_dim"], config["clusters"])
    if config["init_weights"] is not None:
        model.load_state_dict(ray.get(config["init_weights"]), strict=False)
    saved = load_training_state(ray.train.get_checkpoint())
    if saved:
        model.load_state_dict(saved["model"])
    # metrics a resumed run carries on: how the cluster heads started, how they were aligned once they are
    carried = saved.get("consensus", {}) if saved else {}
    if not saved and rank == 0 and config["init_weights"] is None:
        carried["warm_start_samples"] = warm_start(model, config)  # before prepare_model: DDP hands rank 0's weights on
    # the self-labelling step uses the cluster head alone; DDP must not wait for the instance head's gradients
    unused = {"find_unused_parameters": config["self_label_epochs"] > 0}
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=unused)
    hyper = config["model_config"]
    optimizer = torch.optim.Adam(parameter_groups(unwrap(model), hyper), lr=hyper["lr"],
                                 weight_decay=hyper["weight_decay"])
    start_epoch = 0
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        start_epoch = saved["epoch"] + 1
        if rank == 0:
            print(f"resumed run {config['run']} after epoch {saved['epoch'] + 1}", flush=True)
    generator = torch.Generator().manual_seed(config["seed"] + 1000 * start_epoch)
    batches = epoch_batches(config, rank, world)
    epochs = config["epochs"] + config["self_label_epochs"]
    threshold = hyper.get("self_label_threshold", SELF_LABEL_THRESHOLD)
    loop_started = time.monotonic()
    for epoch in range(start_epoch, epochs):
        co_assigned, after_step = None, None
        if hasattr(unwrap(model), "follow_student"):  # TEMI: its teacher follows the student after every step
            phase, step = "PMI", pmi_step
            after_step = functools.partial(unwrap(model).follow_student, epoch, config["epochs"])
        elif epoch < config["epochs"]:  # the last contrastive epoch also counts co-assignments to align the heads
            if epoch == config["epochs"] - 1:
                co_assigned = co_assignment_counter(model, config["clusters"])
            phase, step = "contrastive", functools.partial(contrastive_step, co_assigned=co_assigned)
        else:
            phase, step = "self-labelling", functools.partial(self_labelling_step, threshold=threshold)
        metrics = train_epoch(model, optimizer, batches(epoch), config["batch_size"], generator, step, after_step)
        if "head_loss" in metrics:
            head_loss = global_mean(metrics.pop("head_loss"))
            carried.update(choose_labelling_head(model, head_loss))
            metrics.update(carried, loss=float(head_loss.mean()))  # every worker's, as the heads' losses
        # epoch: epochs trained so far, the number the progress line and the model version show
        metrics.update(epoch=epoch + 1, phase=phase, samples_per_second=metrics["samples_per_second"] * world)
        if rank == 0:
            per_epoch = (time.monotonic() - loop_started) / (epoch + 1 - start_epoch)
            left = f", {duration(per_epoch * (epochs - epoch - 1))} left" if epoch + 1 < epochs else ""
            print(f"epoch {epoch + 1}/{epochs} ({phase}): {epoch_summary(metrics)}{left}", flush=True)
        if co_assigned is not None:
            carried.update(align_cluster_heads(model, co_assigned.table(), rank))
        metrics.update(carried)
        if epoch == epochs - 1 and rank == 0 and table_cluster_heads(model, config):
            metrics["refilled_clusters"] = refill_empty_clusters(model, batches(epoch), config["seed"])
        report_with_checkpoint(metrics, model, optimizer, epoch, config, rank, carried)


def warm_start(model, config: dict) -> int:
    """Cluster heads from k-means, when the config asks for it: a feature model's on the
    representations of a sample of the table's rows (``warm_start_rows``) from
    ``warm_start_clusters`` clusters up, a pretrained pyramid's on a sample of the shards' images
    (``warm_start_images``). Returns how many samples (0: the heads start at random)."""
    hyper = config["model_config"]
    rows = hyper.get("warm_start_rows", 0) if config["clusters"] >= hyper.get("warm_start_clusters", 0) else 0
    if rows and table_cluster_heads(model, config):
        started = time.monotonic()
        sample = clean_representations(model, epoch_batches(config, 0, 1)(0), rows)
        model.cluster_head.warm_start(sample, config["seed"])
        print(f"cluster heads warm-started from k-means on {len(sample):,} rows in "
              f"{duration(time.monotonic() - started)}", flush=True)
        return len(sample)
    count = hyper.get("warm_start_images", 0)
    if not count or not hasattr(model, "warm_start"):
        return 0
    from rayclust.views import sample_of_images

    started = time.monotonic()
    images = sample_of_images(expand_shards(config["shards"]), count, config["model_config"]["image_size"])
    if len(images) < 2 * config["clusters"]:  # the job checked image members, not that they decode
        print(f"cluster heads start at random: {len(images)} decodable images in the sample", flush=True)
        return 0
    model.warm_start(images, config["seed"])
    print(f"cluster heads warm-started from k-means of the pretrained stages on {len(images):,} images "
          f"in {duration(time.monotonic() - started)}", flush=True)
    return len(images)


def co_assignment_counter(model, clusters: int) -> CoAssignments | None:
    """A counter for a model with several cluster heads to align; None for one head (the
    pyramid model's twin heads are not ``ClusterHeads``)."""
    cluster_head = getattr(unwrap(model), "cluster_head", None)
    heads = len(cluster_head.heads) if isinstance(cluster_head, ClusterHeads) else 1
    return CoAssignments(heads, clusters, ray.train.torch.get_device()) if heads > 1 else None


def align_cluster_heads(model, co_assigned: torch.Tensor, rank: int) -> dict:
    """At the end of the contrastive epochs, renumber the cluster heads' clusters to agree, from
    their co-assignments over the last epoch on every worker (``ClusterHeads.align``); from then
    on they label together."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(co_assigned)
    reference, agreement = unwrap(model).cluster_head.align(co_assigned)
    agreement = [round(share, 3) for share in agreement]
    if rank == 0:
        print(f"cluster heads aligned to head {reference}; their agreement with it: {agreement}", flush=True)
    return {"reference_head": reference, "head_agreement": agreement}


def choose_labelling_head(model, head_loss: torch.Tensor) -> dict:
    """TEMI's unsupervised choice after each epoch: the head with the lowest loss over it on every
    worker (``head_loss`` [H]) labels (``TEMI.choose_head``)."""
    return {"labelling_head": unwrap(model).choose_head(head_loss),
            "head_loss": [round(float(loss), 4) for loss in head_loss]}


def table_cluster_heads(model, config: dict) -> bool:
    """A feature model's cluster heads, one or several, on a feature table (the only batches rank 0
    may read on its own: an image model's come from a shard of one Ray Data stream that every rank reads)."""
    return isinstance(getattr(unwrap(model), "cluster_head", None), ClusterHeads) and config["table"] is not None


def refill_empty_clusters(model, batches: Iterable[dict[str, torch.Tensor]], seed: int) -> int:
    """On rank 0, after the last epoch (only rank 0's weights are saved): ``ClusterHeads.refill`` on
    the representations of up to REFILL_ROWS clean rows, read as one more epoch would start."""
    sample = clean_representations(model, batches, REFILL_ROWS)
    with torch.no_grad():
        refilled = unwrap(model).cluster_head.refill(sample, seed)
    print(f"refilled {refilled} clusters the cluster heads' consensus left empty on {len(sample):,} rows, "
          "each with the half of the cluster that a split helps most", flush=True)
    return refilled


def clean_representations(model, batches: Iterable[dict[str, torch.Tensor]], limit: int) -> torch.Tensor:
    """What the model's cluster heads label, for the clean embeddings of up to ``limit`` rows of ``batches``."""
    inner = unwrap(model)
    inner.eval()
    parts, rows = [], 0
    with torch.no_grad():
        for batch in batches:
            parts.append(inner.representation(batch["views"][:, 0]))
            rows += len(parts[-1])
            if rows >= limit:
                break
    return torch.cat(parts)[:limit]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's wrapper."""
    return model.module if hasattr(model, "module") else model


def epoch_summary(metrics: dict) -> str:
    parts = ", ".join(f"{name.removesuffix('_loss')} {metrics[name]:.4f}"
                      for name in ("instance_loss", "cluster_loss", "kept") if name in metrics)
    if "labelling_head" in metrics:
        parts = f"labelling head {metrics['labelling_head']}: {min(metrics['head_loss']):.4f}"
    return f"loss {metrics['loss']:.4f} ({parts}), {metrics['samples_per_second']:.0f} samples/s"


Step = Callable[[torch.nn.Module, dict, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


def epoch_batches(config: dict, rank: int, world: int) -> Callable[[int], Iterable[dict[str, torch.Tensor]]]:
    """epoch -> this worker's batches. Features: the table's files in a new seeded order
    (``train_data``). Images: Ray Data's shard of freshly augmented views, mixed in a buffer of
    a few batches (images are large rows)."""
    device, batch_size, seed = ray.train.torch.get_device(), config["batch_size"], config["seed"]
    if config["table"] is None:
        shard = ray.train.get_dataset_shard("train")
        return lambda epoch: shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=seed * 10_000 + epoch * 100 + rank, device=device)
    neighbours = Neighbours(config["neighbours"]) if config["neighbours"] else None
    return lambda epoch: feature_batches(config["lake"], config["table"], neighbours, batch_size, seed, epoch,
                                         rank, world, device)


def train_epoch(model, optimizer, batches: Iterable[dict[str, torch.Tensor]], batch_size: int,
                generator: torch.Generator, step: Step, after_step: Callable[[], None] | None = None) -> dict:
    """One pass over the worker's batches; ``step`` turns a batch into (loss, parts to log: numbers
    or tensors, averaged over the epoch); ``after_step`` runs after each optimizer step."""
    model.train()
    totals: dict[str, float | torch.Tensor] = {}
    steps = samples = 0
    started = time.perf_counter()
    for batch in batches:
        loss, parts = step(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        for name, value in {"loss": loss.item(), **parts}.items():
            totals[name] = totals.get(name, 0.0) + value
        steps += 1
        samples += len(next(iter(batch.values())))
    if steps == 0:  # images that do not decode can leave fewer than check_enough_images counted
        raise UserError(f"no full batch of {batch_size} samples per worker: lower --batch-size or --workers")
    means = {name: total / steps for name, total in totals.items()}
    return {**means, "samples_per_second": samples / (time.perf_counter() - started)}


def contrastive_step(model, batch: dict[str, torch.Tensor], generator: torch.Generator,
                     co_assigned: CoAssignments | None = None):
    """Contrastive Clustering's instance and cluster losses on a positive pair; with a counter,
    also counts which clusters the heads assign the first view to together (``align_cluster_heads``)."""
    outputs = model(*view_pair(batch, generator))
    loss, parts = contrastive_clustering_loss(outputs)
    if co_assigned is not None:
        co_assigned.add(per_cluster_head(outputs[0][2]).detach())
    return loss, parts


def pmi_step(model, batch: dict[str, torch.Tensor], generator: torch.Generator):
    """TEMI's PMI loss between a row's view and its partner (a neighbour or another view), averaged
    over the heads; each head's loss is kept to choose the labelling head."""
    inner = unwrap(model)
    per_head, marginal = pmi_loss(*model(*view_pair(batch, generator)), inner.marginal, inner.loss_settings)
    inner.marginal.copy_(marginal)
    return per_head.mean(), {"head_loss": per_head.detach()}


def self_labelling_step(model, batch: dict[str, torch.Tensor], generator: torch.Generator, threshold: float):
    """SCAN's self-labelling: each cluster head's confident clusters of the clean features teach it
    one augmented view per row. (Each head keeps its own clusters; teaching them the heads' mean
    would starve the clusters the heads disagree on, which then die.)"""
    views = batch["views"]
    with torch.no_grad():
        targets = per_cluster_head(model(views[:, 0]))
    rows = torch.arange(views.shape[0], device=views.device)
    first_augmented = 1 if views.shape[1] > 1 else 0
    pick = torch.randint(first_augmented, views.shape[1], (len(rows),), generator=generator).to(views.device)
    per_head = [self_labelling_loss(probs, target, threshold)
                for probs, target in zip(per_cluster_head(model(views[rows, pick])), targets)]
    loss = torch.stack([head_loss for head_loss, _ in per_head]).mean()
    return loss, {"kept": sum(kept for _, kept in per_head) / len(per_head)}


def view_pair(batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's positive pair: an image model's weak and strong views; for features, one of each row's
    views (clean or augmented), drawn at random per row, and either another of its views or, when
    the batch carries one, a nearest neighbour's clean embedding (drawn by ``train_data``).
    """
    if "weak" in batch:
        return batch["weak"].float(), batch["strong"].float()
    views = batch["views"]
    rows = torch.arange(views.shape[0], device=views.device)
    order = torch.rand(views.shape[:2], generator=generator).argsort(1).to(views.device)
    first = views[rows, order[:, 0]]
    if "neighbour" in batch:
        return first, batch["neighbour"]
    return first, views[rows, order[:, 1]]


def report_with_checkpoint(metrics: dict, model, optimizer, epoch: int, config: dict, rank: int,
                           carried: dict) -> None:
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "consensus": carried}  # its name before it carried more than the heads' consensus
            torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
            with open(os.path.join(directory, CONFIG_FILE), "w") as f:
                json.dump(model_description(config), f, indent=2)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def model_description(config: dict) -> dict:
    keys = ("model_config", "feature_dim", "clusters", "clusters_chosen", "encoder", "run", "shards", "init")
    return {key: config[key] for key in keys}


def check_resume_checkpoint(lake: Lake, run: str) -> None:
    """The checkpoint a run named ``run`` would resume from, loaded on the driver: one that does not
    load stops the job here in one line, where on the workers it would fail every restart."""
    try:
        resumed = ray.train.Result.from_path(lake.path(MODELS, run), storage_filesystem=lake.arrow_fs).checkpoint
    except RuntimeError:  # no run state: a new run
        return
    load_training_state(resumed)


def load_training_state(checkpoint: ray.train.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_tensors(os.path.join(directory, CHECKPOINT_FILE),
                            f"resuming from {checkpoint.path}/{CHECKPOINT_FILE}")


@dataclass(frozen=True)
class CheckpointEvaluation:
    health: ClusterHealth
    quality: QualityReport | None  # None: not asked for, or no row of the sample has a label

    def __str__(self) -> str:
        return "\n".join(str(part) for part in (self.health, self.quality) if part is not None)


def evaluate_checkpoint(lake: Lake, latest: dict, features: dict[str, str], quality: bool = True
                        ) -> CheckpointEvaluation:
    """The model's predictions on the first EVAL_ROWS rows of the feature files (shard -> path):
    their cluster health and, with ``quality``, ACC/NMI/ARI beside k-means on those with a label.
    The driver holds that bounded sample only, whatever the size of the table."""
    from rayclust.evaluation import EVAL_ROWS, compare_with_kmeans, kmeans_baseline  # scikit-learn: driver only

    sample = read_sample(lake, features, ["label", "embedding"], EVAL_ROWS)
    model = load_model(lake, latest)
    clean = list_to_numpy(sample.column("embedding"), len(sample.column("embedding")[0]))
    with torch.no_grad():
        confidence, predicted = model.predict(torch.from_numpy(clean)).max(1)
    health = health_of(predicted.numpy(), confidence.numpy(), latest["clusters"],
                       f"the feature table's first rows (at most {EVAL_ROWS:,})")
    labelled = pc.is_valid(sample.column("label")).to_numpy(zero_copy_only=False)
    if not (quality and labelled.any()):
        return CheckpointEvaluation(health, None)
    truth = sample.column("label").to_numpy(zero_copy_only=False)[labelled].astype(np.int64)
    return CheckpointEvaluation(health, compare_with_kmeans(latest["model_version"], truth, predicted.numpy()[labelled],
                                                            kmeans_baseline(lake, features, latest["clusters"])))
