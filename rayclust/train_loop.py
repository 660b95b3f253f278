"""What every Ray Train worker runs: the training loop of a contrastive-clustering model, its
steps, the warm start and alignment of the cluster heads, and checkpoints through
``ray.train.report``. The driver (``rayclust.training``) hands Ray Train ``run_train_loop``, which
imports this module on the workers only.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from typing import Callable, Iterable

import ray
import ray.train
import ray.train.torch
import torch

from rayclust.errors import UserError
from rayclust.losses import (SELF_LABEL_THRESHOLD, contrastive_clustering_loss, global_mean, per_cluster_head,
                             pmi_loss, self_labelling_loss)
from rayclust.models import build_model, parameter_groups
from rayclust.models.checkpoint import CHECKPOINT_FILE, CONFIG_FILE
from rayclust.models.heads import REFILL_ROWS, ClusterHeads, CoAssignments
from rayclust.neighbours import Neighbours
from rayclust.progress import duration
from rayclust.shards import expand_shards
from rayclust.train_data import feature_batches
from rayclust.training import load_training_state


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
