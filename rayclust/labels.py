"""Features become labels: batch inference with the LATEST model over the feature table.

Writes ``LAKE/labels/`` (Parquet, Hive-partitioned by shard): exactly one row per feature
row with ``key, cluster, confidence, model_version, labeled_at``. Re-running replaces the
partitions it labels, so it never duplicates.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import torch
from ray.data import ActorPoolStrategy

from rayclust.errors import UserError
from rayclust.evaluation import QualityReport, compare_with_kmeans
from rayclust.lake import FEATURES, LABELS, MODELS, Lake, PartitionedSink, list_to_numpy
from rayclust.runtime import cluster_gpus, encoder_actor_count, init_ray
from rayclust.training import EVAL_ROWS, load_model


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
        n = batch.num_rows
        return pa.table({
            "key": batch.column("key"),
            "shard": batch.column("shard").cast(pa.string()),
            "cluster": pa.array(probabilities.argmax(1), pa.int32()),
            "confidence": pa.array(probabilities.max(1), pa.float32()),
            "model_version": pa.array([self.version] * n, pa.string()),
            "labeled_at": pa.array([int(time.time() * 1e6)] * n, pa.timestamp("us", tz="UTC")),
            "error": pa.nulls(n, pa.string()),
        })


def infer(lake_uri: str, batch_size: int = 1024, shards: list[str] | None = None) -> InferSummary:
    """Label every feature row (or only those of ``shards``) with the LATEST model."""
    lake = Lake.open(lake_uri)
    latest = latest_model(lake)
    if not lake.has_table(FEATURES):
        raise UserError(f"no features in {lake.uri}: run jobs/embed.py first")
    init_ray()
    started = time.time()
    shards = shards or lake.partitions(FEATURES)
    lake.drop_partitions(LABELS, shards)
    dataset = ray.data.read_parquet(
        [lake.path(FEATURES, f"shard={s}") for s in shards], filesystem=lake.arrow_fs,
        partitioning=ray.data.datasource.Partitioning("hive", base_dir=lake.path(FEATURES)),
    ).select_columns(["key", "shard", "embedding"])
    labelled = dataset.map_batches(
        Labeler, fn_constructor_kwargs={"lake_uri": lake.uri, "latest": latest, "threads": 1},
        batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=encoder_actor_count()),
        num_gpus=1 if cluster_gpus() else 0, num_cpus=1,
    )
    sink = PartitionedSink(lake, LABELS, stage="infer")
    labelled.write_datasink(sink)
    summary = InferSummary(latest["model_version"], len(shards), sink.rows_written, time.time() - started)
    print(summary, flush=True)
    report = evaluate_labels(lake, latest["clusters"])
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
