"""Labels become cluster descriptions: each cluster's centre, size, mean confidence and names.

``LAKE/clusters/<model_version>.parquet`` (e.g. ``clusters/demo/epoch-61.parquet``), one row per
cluster: ``cluster, model_version, size, mean_confidence, name, top_names`` (a list of
``{name, score}``, best first) and ``centre`` (unit vector in the encoder's space).

- Centres come first, from a bounded sample (CENTRE_ROWS rows of the feature table, file by
  file, labelled on the driver): the normalised mean of each cluster's clean embeddings. The
  labellers get them, so each label row carries ``distance``, its cosine distance to its
  cluster's centre (SQL sorts a cluster from typical to odd with it).
- Sizes, mean confidences and near-duplicate counts count every label: Ray Data counts each
  block of the label files' three columns, the driver adds the K-long counts up as they arrive.
- Names: ``rayclust.naming``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from rayclust.health import ClusterHealth
from rayclust.lake import FEATURES, Lake, list_to_numpy, read_sample
from rayclust.naming import ClusterNames, name_clusters

CLUSTERS = "clusters"
CENTRE_ROWS = 50_000
COUNTED_COLUMNS = ("cluster", "confidence", "duplicate_of")
PREDICT_ROWS = 8192  # rows per forward pass on the driver
NAME_STRUCT = pa.struct([("name", pa.string()), ("score", pa.float32())])
CLUSTER_SCHEMA = pa.schema([("cluster", pa.int32()), ("model_version", pa.string()), ("size", pa.int64()),
                            ("mean_confidence", pa.float32()), ("name", pa.string()),
                            ("top_names", pa.list_(NAME_STRUCT)), ("centre", pa.list_(pa.float32())),
                            ("duplicates", pa.int64())])


@dataclass
class Centres:
    """Per cluster, from a bounded sample: ``unit`` [K, D] (NaN rows for a cluster with no
    member in the sample), ``mean`` [K, D] the members' mean embedding, ``members`` [K]; and the
    sample itself: ``sample`` [N, D] unit rows, ``assigned`` [N] their clusters."""

    unit: np.ndarray
    mean: np.ndarray
    members: np.ndarray
    sample: np.ndarray
    assigned: np.ndarray

    @property
    def whole_table(self) -> bool:
        """Whether the sample is every row: the table has fewer than CENTRE_ROWS."""
        return len(self.assigned) < CENTRE_ROWS


@dataclass
class ClusterDescription:
    cluster: int
    size: int
    mean_confidence: float | None
    names: ClusterNames
    duplicates: int = 0

    @property
    def name(self) -> str:
        return self.names.name or f"cluster {self.cluster}"


def clusters_file(model_version: str) -> tuple[str, ...]:
    return (CLUSTERS, f"{model_version}.parquet")


def sample_centres(lake: Lake, features: dict[str, str], model: torch.nn.Module, clusters: int) -> Centres:
    """Centres of the model's clusters over the first CENTRE_ROWS feature rows (files: shard -> path)."""
    sample = read_sample(lake, features, ["embedding"], CENTRE_ROWS)
    dim = len(sample.column("embedding")[0])
    embeddings = list_to_numpy(sample.column("embedding"), dim)
    assigned = np.concatenate([predicted_clusters(model, embeddings[i:i + PREDICT_ROWS])
                               for i in range(0, len(embeddings), PREDICT_ROWS)])
    return centres_of(embeddings, assigned, clusters)


def predicted_clusters(model: torch.nn.Module, embeddings: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.predict(torch.from_numpy(embeddings)).argmax(1).numpy()


def centres_of(embeddings: np.ndarray, assigned: np.ndarray, clusters: int) -> Centres:
    members = np.bincount(assigned, minlength=clusters)
    sample = unit_rows(embeddings).astype(np.float32)
    sums = np.zeros((clusters, embeddings.shape[1]), np.float64)
    np.add.at(sums, assigned, sample)
    raw = np.zeros_like(sums)
    np.add.at(raw, assigned, embeddings)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (raw / members[:, None]).astype(np.float32)
        unit = unit_rows(sums).astype(np.float32)  # 0/0 for an empty cluster: NaN, "no centre"
    return Centres(unit, mean, members, sample, assigned)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def centre_distances(embeddings: np.ndarray, assigned: np.ndarray, unit_centres: np.ndarray) -> np.ndarray:
    """Cosine distance of each row to its cluster's centre; NaN where the cluster has none."""
    similarity = np.einsum("nd,nd->n", unit_rows(embeddings), unit_centres[assigned])
    return (1.0 - similarity).astype(np.float32)


def stored_centres(lake: Lake, model_version: str) -> np.ndarray | None:
    """The unit centres the model's infer wrote to the clusters table, if it did."""
    path = lake.path(*clusters_file(model_version))
    if not lake.fs.exists(path):
        return None
    rows = pq.read_table(path, columns=["cluster", "centre"], filesystem=lake.arrow_fs).sort_by("cluster")
    dim = max((len(c) for c in rows.column("centre").to_pylist() if c), default=0)
    return np.array([c if c else [np.nan] * dim for c in rows.column("centre").to_pylist()], np.float32)


def centres_for(lake: Lake, latest: dict, model: torch.nn.Module) -> np.ndarray:
    """The unit centres to label new rows with: infer's, or (before any infer) a fresh sample's."""
    stored = stored_centres(lake, latest["model_version"])
    if stored is not None:
        return stored
    return sample_centres(lake, lake.newest_files(FEATURES), model, latest["clusters"]).unit


@dataclass
class LabelCounts:
    """Per cluster over every label: ``sizes``, ``confidence`` (mean; NaN when empty), ``duplicates``
    (rows with ``duplicate_of``)."""

    sizes: np.ndarray
    confidence: np.ndarray
    duplicates: np.ndarray


def label_counts(lake: Lake, label_files: list[str], clusters: int) -> LabelCounts:
    """Each cluster's counts over every row of ``label_files``: Ray Data counts each block (K numbers
    per block, no shuffle) and the driver adds them up as they arrive, so it holds K counters at any
    size. (Files written before ``duplicate_of`` existed read it as null.)"""
    import ray

    rows = ray.data.read_parquet(label_files, filesystem=lake.arrow_fs).select_columns(list(COUNTED_COLUMNS))
    per_block = rows.map_batches(block_counts, batch_size=None, batch_format="pyarrow",
                                 fn_kwargs={"clusters": clusters})
    sizes, confidence, duplicates = np.zeros(clusters, np.int64), np.zeros(clusters), np.zeros(clusters, np.int64)
    for batch in per_block.iter_batches(batch_size=None, batch_format="numpy"):
        sizes += batch["sizes"].sum(0)
        confidence += batch["confidence"].sum(0)
        duplicates += batch["duplicates"].sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return LabelCounts(sizes, (confidence / sizes).astype(np.float32), duplicates)


def block_counts(rows: pa.Table, clusters: int) -> dict[str, np.ndarray]:
    """Ray Data stage: a block of labels becomes one row of per-cluster sizes, confidence sums and
    duplicate counts."""
    cluster = rows.column("cluster").to_numpy(zero_copy_only=False)
    confidence = rows.column("confidence").to_numpy(zero_copy_only=False).astype(np.float64)
    duplicated = pc.is_valid(rows.column("duplicate_of")).to_numpy(zero_copy_only=False)
    return {"sizes": np.bincount(cluster, minlength=clusters)[None],
            "confidence": np.bincount(cluster, confidence, minlength=clusters)[None],
            "duplicates": np.bincount(cluster, duplicated, minlength=clusters).astype(np.int64)[None]}


def describe_clusters(lake: Lake, latest: dict, encoder: str, centres: Centres, label_files: list[str],
                      vocabulary: list[str] | None) -> list[ClusterDescription]:
    """Write the model's clusters table and return its rows."""
    counts = label_counts(lake, label_files, latest["clusters"])
    names = name_clusters(encoder, centres.unit, centres.mean, vocabulary)
    described = [ClusterDescription(k, int(counts.sizes[k]), None if np.isnan(counts.confidence[k])
                                    else float(counts.confidence[k]), names[k], int(counts.duplicates[k]))
                 for k in range(latest["clusters"])]
    lake.write_parquet(clusters_table(described, latest["model_version"], centres.unit), *clusters_file(
        latest["model_version"]))
    return described


def health_of_clusters(described: list[ClusterDescription]) -> ClusterHealth:
    """The label-free health summary of every label, from the clusters' counts (no rows read again)."""
    sizes = tuple(d.size for d in described)
    total = sum(d.size * d.mean_confidence for d in described if d.mean_confidence is not None)
    return ClusterHealth(sizes, total / sum(sizes) if sum(sizes) else 0.0, "all labels")


def clusters_table(described: list[ClusterDescription], model_version: str, unit_centres: np.ndarray) -> pa.Table:
    centres = [None if np.isnan(c).any() else c.tolist() for c in unit_centres]
    return pa.table({
        "cluster": [d.cluster for d in described],
        "model_version": [model_version] * len(described),
        "size": [d.size for d in described],
        "mean_confidence": [d.mean_confidence for d in described],
        "name": [d.name for d in described],
        "top_names": [[{"name": n.name, "score": n.score} for n in d.names.top] for d in described],
        "centre": centres,
        "duplicates": [d.duplicates for d in described],
    }, schema=CLUSTER_SCHEMA)


def read_clusters(lake: Lake, model_version: str) -> pa.Table | None:
    path = lake.path(*clusters_file(model_version))
    if not lake.fs.exists(path):
        return None
    return pq.read_table(path, filesystem=lake.arrow_fs).sort_by("cluster")
