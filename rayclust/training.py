"""Features (or images) become a model: the driver's side of training. It checks the inputs, plans
the workers and the batch, mines the neighbours, and hands ``rayclust.train_loop`` to Ray Train
(DDP through ``rayclust.torch_backend``); once the run ends it points ``LATEST`` at its checkpoint.

Workers stream the feature table's files themselves, in a new seeded order every epoch
(``rayclust.train_data``), with each row's nearest rows mined once per table
(``rayclust.neighbours``); an image model (``"input": "images"``) streams weak and strong views
of the shards' images instead, made afresh every epoch by Ray Data CPU tasks (``rayclust.views``,
through ``get_dataset_shard``);
checkpoints go to ``LAKE/models/<run>/`` through ``ray.train.report``; ``LATEST`` is
written only once training has finished and its last checkpoint is complete. Running
again with the same ``run`` name resumes from that run's last checkpoint; so does a run whose
worker dies (Ray Train's ``FailureConfig``).

This module does not import torch (a test holds it to that), and the driver loads it only to
check an ``--init`` file or the checkpoint a run resumes from, and, once the run has ended, to
evaluate the model: importing torch costs a process about 260 MiB of private memory, which the
driver would hold beside every worker.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from rayclust.cli import ClusterRange
from rayclust.errors import UserError
from rayclust.health import ClusterHealth, health_of
from rayclust.lake import FEATURES, MODELS, Lake, list_to_numpy, read_sample
from rayclust.models import build_model, is_image_model, load_tensors, model_config, pretrained_state
from rayclust.models.checkpoint import CHECKPOINT_FILE, DIGEST, digest_of, load_model
from rayclust.neighbours import TableRows, neighbour_store, table_rows
from rayclust.runtime import cluster_cpus, cluster_gpus, init_ray, largest_node_cpus, ray_ends_with_job
from rayclust.shards import ROWS_PER_BLOCK, count_images, expand_shards, read_shards
from rayclust.torch_backend import LeanTrainer, TorchProcessGroup
from rayclust.train_data import least_rows_per_worker

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
    init_ray(prestart_workers=False)
    run = settings.run or f"{settings.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_resume_checkpoint(lake, run)
    plan = plan_workers(settings.workers)
    batch_size = training_batch_size(settings, config, rows, plan.workers)
    if images:
        check_enough_images(uris, batch_size, plan.workers)
    neighbours = feature_neighbours(lake, table, config.get("neighbours", 0)) if table is not None else None
    loop_config = {
        "model_config": config, "feature_dim": dim, "clusters": settings.clusters,
        "epochs": contrastive_epochs(settings, config, rows, batch_size, plan.workers),
        "self_label_epochs": self_label_epochs,
        "batch_size": batch_size,
        "seed": settings.seed, "threads": plan.threads, "run": run,
        "lake": lake.uri, "table": None if table is None else table.layout, "neighbours": neighbours,
        "encoder": None if table is None else table.encoder,
        "shards": absolute_pattern(settings.shards) if images else None,
        "init": settings.init, "init_weights": ray.put(init) if init else None,
        "clusters_chosen": settings.clusters_chosen.as_json() if settings.clusters_chosen else None,
    }
    trainer = LeanTrainer(
        run_train_loop,
        train_loop_config=loop_config,
        backend_config=TorchProcessGroup("nccl" if plan.use_gpu else "gloo"),
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
        ray_ends_with_job=ray_ends_with_job(),
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


def run_train_loop(config: dict) -> None:
    """On every Ray Train worker: ``rayclust.train_loop``, imported there and nowhere else (torch)."""
    from rayclust.train_loop import train_loop

    train_loop(config)


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


def contrastive_epochs(settings: TrainSettings, config: dict, rows: tuple[int, ...] | None, batch_size: int,
                       workers: int) -> int:
    """The settings' contrastive (TEMI: PMI) epochs, else the model config's, raised for a small feature table
    until they make the config's ``min_steps`` optimizer steps (a table's steps an epoch shrink with
    it, and a contrastive head learns per step, not per pass over the rows)."""
    epochs, min_steps = settings.epochs or config["epochs"], config.get("min_steps", 0)
    if settings.epochs or rows is None or not min_steps:
        return epochs
    steps = least_rows_per_worker(rows, workers) // batch_size  # the fewest an epoch's deal can make
    raised = max(epochs, -(-min_steps // steps))
    if raised > epochs:
        phase = "PMI" if config["model"] == "temi" else "contrastive"
        print(f"{phase} epochs {epochs} -> {raised}: {steps} steps an epoch on {sum(rows):,} rows, "
              f"at least {min_steps} steps in all", flush=True)
    return raised


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
    import torch  # once training has ended: its workers and controller are gone

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
