"""Features become labels: batch inference with the LATEST model over the feature table.

Writes ``LAKE/labels/`` (Parquet, Hive-partitioned by shard): exactly one row per feature
row with ``key, cluster, confidence, model_version, labeled_at`` (and ``write_id``). Re-running
replaces the partitions it labels (staged, then published per shard), so it never duplicates.

An image model (the pyramid model) labels the images of the shards it was trained on instead
(``infer_images``): decoded and cleanly preprocessed in CPU tasks, bad samples to ``errors/``.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import torch
from ray.data import ActorPoolStrategy

from rayclust.errors import UserError
from rayclust.evaluation import QualityReport, cluster_metrics, compare_with_kmeans
from rayclust.lake import ERRORS, FEATURES, LABELS, MODELS, Lake, PartitionedSink, Write, filesystem_for, list_to_numpy
from rayclust.models import is_image_model
from rayclust.runtime import cluster_gpus, encoder_actor_count, init_ray
from rayclust.shards import ROWS_PER_BLOCK, expand_shards, read_shards, samples_of_tar, shard_name
from rayclust.training import EVAL_ROWS, checkpoint_description, load_model
from rayclust.views import clean_images


@dataclass
class InferSummary:
    model_version: str
    shards: int
    rows: int
    seconds: float

    def __str__(self) -> str:
        return (f"labelled {self.rows} samples of {self.shards} shards with {self.model_version} "
                f"in {self.seconds:.1f}s")


def latest_model(lake: Lake) -> dict:
    latest = lake.read_json(MODELS, "LATEST")
    if latest is None:
        raise UserError(f"no trained model in {lake.uri}: run jobs/train.py first")
    return latest


class Labeler:
    """Actor: the LATEST model, loaded once, labels batches of clean embeddings."""

    def __init__(self, lake_uri: str, latest: dict, threads: int):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.model = load_model(Lake.open(lake_uri), latest, self.device)
        self.version = latest["model_version"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        embedding = batch.column("embedding")
        features = torch.from_numpy(list_to_numpy(embedding, len(embedding[0]))).to(self.device)
        probabilities = self.model.predict(features).float().cpu().numpy()
        return self.label_rows(batch.column("key"), batch.column("shard").cast(pa.string()), probabilities,
                               pa.nulls(batch.num_rows, pa.string()))

    def label_rows(self, keys, shards, probabilities: np.ndarray, errors) -> pa.Table:
        """One batch in the labels schema, plus ``shard`` and ``error`` for ``PartitionedSink``."""
        n = len(keys)
        return pa.table({
            "key": keys,
            "shard": shards,
            "cluster": pa.array(probabilities.argmax(1), pa.int32()),
            "confidence": pa.array(probabilities.max(1), pa.float32()),
            "model_version": pa.array([self.version] * n, pa.string()),
            "labeled_at": pa.array([int(time.time() * 1e6)] * n, pa.timestamp("us", tz="UTC")),
            "error": errors,
        })


class ImageLabeler(Labeler):
    """Actor: labels batches of clean images (``views.clean_images``); rows that failed keep their error."""

    def __init__(self, lake_uri: str, latest: dict, threads: int):
        super().__init__(lake_uri, latest, threads)
        self.clusters = latest["clusters"]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        good = batch["error"] == ""
        probabilities = np.zeros((len(good), self.clusters), np.float32)
        if good.any():
            pixels = torch.from_numpy(batch["pixels"][good]).to(self.device).float()
            probabilities[good] = self.model.predict(pixels).float().cpu().numpy()
        errors = pa.array([e or None for e in batch["error"]], pa.string())
        return self.label_rows(pa.array(batch["key"], pa.string()), pa.array(batch["shard"], pa.string()),
                               probabilities, errors)


def infer(lake_uri: str, batch_size: int = 1024, shards: list[str] | None = None,
          evaluate: bool = True) -> InferSummary:
    """Label every feature row (or only those of ``shards``) with the LATEST model.

    ``evaluate`` also prints ACC/NMI/ARI over the whole lake (refresh, labelling a few new
    shards, skips it: it reads every feature row).
    """
    lake = Lake.open(lake_uri)
    latest = latest_model(lake)
    description = checkpoint_description(lake, latest)
    if is_image_model(description["model_config"]):
        return infer_images(lake, latest, description, batch_size, shards, evaluate)
    if not lake.has_table(FEATURES):
        raise UserError(f"no features in {lake.uri}: run jobs/embed.py first")
    init_ray()
    started = time.time()
    shards = shards or lake.partitions(FEATURES)
    write = Write(lake)
    dataset = ray.data.read_parquet(
        [lake.path(FEATURES, f"shard={s}") for s in shards], filesystem=lake.arrow_fs,
        partitioning=ray.data.datasource.Partitioning("hive", base_dir=lake.path(FEATURES)),
    ).select_columns(["key", "shard", "embedding"])
    labelled = dataset.map_batches(
        Labeler, fn_constructor_kwargs={"lake_uri": lake.uri, "latest": latest, "threads": 1},
        batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=encoder_actor_count()),
        num_gpus=1 if cluster_gpus() else 0, num_cpus=1,
    )
    sink = PartitionedSink(lake, LABELS, stage="infer", write=write)
    labelled.write_datasink(sink)
    write.commit(shards, [LABELS])
    summary = InferSummary(latest["model_version"], len(shards), sink.rows_written, time.time() - started)
    print(summary, flush=True)
    report = evaluate_labels(lake, latest["clusters"]) if evaluate else None
    if report:
        print(report, flush=True)
    return summary


def evaluate_labels(lake: Lake, clusters: int) -> QualityReport | None:
    """ACC/NMI/ARI of the written labels (joined with the features' ``label``) beside k-means."""
    features = pads.dataset(lake.path(FEATURES), filesystem=lake.arrow_fs, partitioning="hive")
    truth = features.to_table(columns=["key", "label", "embedding"], filter=pc.is_valid(pc.field("label")))
    truth = truth.slice(0, EVAL_ROWS)
    if truth.num_rows == 0:
        return None
    labels = pads.dataset(lake.path(LABELS), filesystem=lake.arrow_fs, partitioning="hive")
    rows = pa.table({"key": truth.column("key"), "row": np.arange(truth.num_rows)})
    joined = rows.join(labels.to_table(columns=["key", "cluster"]), "key", join_type="inner")
    truth = truth.take(joined.column("row"))
    clean = list_to_numpy(truth.column("embedding"), len(truth.column("embedding")[0]))
    return compare_with_kmeans("rayclust labels", truth.column("label").to_numpy(),
                               joined.column("cluster").to_numpy(), clean, clusters)


def image_shards(pattern: str, shards: list[str] | None) -> list[str]:
    """URIs of the shards an image model trained on, or of the named ``shards`` among them."""
    uris = expand_shards(pattern)
    if not shards:
        return uris
    known = {shard_name(u): u for u in uris}
    missing = sorted(set(shards) - set(known))
    if missing:
        raise UserError(f"shards {', '.join(missing)} are not among the model's shards {pattern}")
    return [known[s] for s in shards]


def infer_images(lake: Lake, latest: dict, description: dict, batch_size: int, shards: list[str] | None,
                 evaluate: bool) -> InferSummary:
    """Label every image of the shards an image model trained on (recorded in its checkpoint).

    Re-running replaces those shards' labels and errors partitions; errors here come from the
    same decoding as the embed stage's, so they list the same bad samples.
    """
    uris = image_shards(description["shards"], shards)
    names = [shard_name(u) for u in uris]
    init_ray()
    started = time.time()
    write = Write(lake)
    labelled = read_shards(uris).map_batches(
        clean_images, fn_kwargs={"image_size": description["model_config"]["image_size"]},
        batch_size=ROWS_PER_BLOCK, batch_format="pyarrow",
    ).map_batches(
        ImageLabeler, fn_constructor_kwargs={"lake_uri": lake.uri, "latest": latest, "threads": 1},
        batch_size=batch_size, compute=ActorPoolStrategy(size=encoder_actor_count()),
        num_gpus=1 if cluster_gpus() else 0, num_cpus=1,
    )
    sink = PartitionedSink(lake, LABELS, stage="infer", write=write)
    labelled.write_datasink(sink)
    write.commit(names, [LABELS, ERRORS])
    summary = InferSummary(latest["model_version"], len(uris), sink.rows_written, time.time() - started)
    print(f"{summary}; {sink.errors_written} bad samples recorded in errors/", flush=True)
    report = evaluate_image_labels(lake, uris) if evaluate else None
    if report:
        print(report, flush=True)
    return summary


def labelled_samples(uris: list[str]) -> Iterator[tuple[str, int]]:
    """(key, label) of each sample with a ``.cls``, streamed from the shards on the driver."""
    for uri in uris:
        fs, path = filesystem_for(uri)
        with fs.open(path, "rb") as stream:
            for row in samples_of_tar(stream, path):
                if row.get("label") is not None:
                    yield row["key"], row["label"]


def evaluate_image_labels(lake: Lake, uris: list[str]) -> QualityReport | None:
    """ACC/NMI/ARI of the written labels against the shards' ``.cls`` labels (first EVAL_ROWS).

    No k-means row: an image-only lake has no features to run it on.
    """
    pairs = list(itertools.islice(labelled_samples(uris), EVAL_ROWS))
    if not pairs:
        return None
    truth = pa.table({"key": pa.array([k for k, _ in pairs], pa.string()),
                      "label": pa.array([label for _, label in pairs], pa.int64())})
    labels = pads.dataset(lake.path(LABELS), filesystem=lake.arrow_fs, partitioning="hive")
    joined = truth.join(labels.to_table(columns=["key", "cluster"]), "key", join_type="inner")
    return QualityReport(joined.num_rows, {"rayclust labels": cluster_metrics(
        joined.column("label").to_numpy(), joined.column("cluster").to_numpy())})
