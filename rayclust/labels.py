"""Features become labels: batch inference with the LATEST model over the feature table.

Writes ``LAKE/labels/`` (one Parquet file per shard): exactly one row per feature row with
``key, cluster, confidence, distance, model_version, labeled_at`` (and ``write_id``; ``distance``
is the row's cosine distance to its cluster's centre) and the model's clusters table
(``rayclust.clusters``: sizes, centres, names). Each shard is
published as soon as all its rows are labelled (``rayclust.commit``), so a killed run keeps what
it finished, and running it again labels only the shards not yet labelled by this model from
these features.

An image model (the pyramid model) labels the images of the shards it was trained on instead
(``infer_images``): decoded and cleanly preprocessed in CPU tasks, bad samples to ``errors/``.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch
from ray.data.datasource import FileBasedDatasource

from rayclust.clusters import (Centres, ClusterDescription, centre_distances, clusters_file, describe_clusters,
                               health_of_clusters, label_counts, sample_centres)
from rayclust.duplicates import (DEFAULT_EPSILON, DUPLICATE_OF, Buckets, DuplicatePass, cluster_buckets,
                                 find_duplicates)
from rayclust.commit import (CommitSummary, Output, commit_as_shards_finish, fingerprint_of, published_path,
                             write_pieces)
from rayclust.errors import UserError
from rayclust.features import labels_fingerprint
from rayclust.health import label_health
from rayclust.lake import ERRORS, FEATURES, LABELS, Lake, filesystem_for, list_to_numpy, new_write_id, read_sample
from rayclust.lock import LakeLock
from rayclust.models import is_image_model
from rayclust.models.checkpoint import checkpoint_description, latest_model, load_model
from rayclust.naming import check_vocabulary_fits, read_vocabulary
from rayclust.progress import Progress
from rayclust.runtime import (LABELER_CPUS, WRITE_CPUS, encoder_pool, init_ray, labeler_gpus, labeler_pool,
                              require_shared)
from rayclust.shards import (END_OF_SHARD, READ_CPUS, ROWS_PER_BLOCK, WHOLE_SHARD_KEY, expand_shards, read_shards,
                             samples_of_tar, shard_name)
from rayclust.stages import Stage, run
from rayclust.views import clean_images

if TYPE_CHECKING:
    from rayclust.evaluation import QualityReport

LABEL_COLUMNS = ("key", "source", "cluster", "confidence", "distance", "model_version", "labeled_at", DUPLICATE_OF)
OPTIONAL_FEATURE_COLUMNS = {"source": pa.string()}  # absent from feature files written before it existed


@dataclass
class InferSummary:
    model_version: str
    shards: int
    rows: int
    seconds: float
    skipped: int = 0
    failures: dict[str, str] | None = None

    def __str__(self) -> str:
        line = (f"labelled {self.rows} samples of {self.shards} shards with {self.model_version} "
                f"in {self.seconds:.1f}s")
        if self.skipped:
            line += f"; {self.skipped} shards already labelled by this model from the same features"
        return "\n".join([line, *(f"  failed {s}: {r}" for s, r in sorted((self.failures or {}).items()))])


class FeatureFileReader(FileBasedDatasource):
    """Ray Data datasource over the feature table's files (one per shard): ``key`` and
    ``embedding`` per row, then the shard's end row, as ``shards.rows_of_shard`` ends a tar."""

    _FILE_EXTENSIONS = ["parquet"]

    def __init__(self, paths: list[str], columns: list[str], **kwargs):
        super().__init__(paths, **kwargs)
        self.columns = columns

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # Parquet needs random access to its footer

    def _read_stream(self, stream: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        shard = path.rsplit("/", 2)[-2].split("=", 1)[1]
        parquet = pq.ParquetFile(stream)
        types = {c: OPTIONAL_FEATURE_COLUMNS.get(c) or parquet.schema_arrow.field(c).type for c in self.columns}
        present = [c for c in self.columns if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=ROWS_PER_BLOCK * 4, columns=present):
            rows = pa.Table.from_batches([batch])
            for column in self.columns:
                if column not in present:
                    rows = rows.append_column(column, pa.nulls(rows.num_rows, types[column]))
            yield with_shard(rows, shard, None, None)
        end = pa.table({c: pa.nulls(1, types[c]) for c in self.columns})
        yield with_shard(end, shard, END_OF_SHARD, parquet.metadata.num_rows)


def with_shard(rows: pa.Table, shard: str, error: str | None, shard_rows: int | None) -> pa.Table:
    n = rows.num_rows
    if error:
        rows = rows.set_column(rows.schema.get_field_index("key"), "key", pa.array([WHOLE_SHARD_KEY] * n, pa.string()))
    return (rows.append_column("shard", pa.array([shard] * n, pa.string()))
            .append_column("error", pa.array([error] * n, pa.string()))
            .append_column("shard_rows", pa.array([shard_rows] * n, pa.int64())))


class Labeler:
    """Actor: the LATEST model labels the good rows of batches of clean embeddings. The driver loads
    it and hands it over: an actor that read it from the store would, if the store stopped
    answering, end the job in Ray's report of a failed actor creation, not in one line."""

    def __init__(self, model: torch.nn.Module, latest: dict, threads: int, centres: np.ndarray | None = None):
        self.centres = centres
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.model = model.to(self.device)
        self.version = latest["model_version"]
        self.clusters = latest["clusters"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        probabilities = np.zeros((batch.num_rows, self.clusters), np.float32)
        distance = np.full(batch.num_rows, np.nan, np.float32)
        if good.any():
            rows = batch.filter(pa.array(good)).column("embedding")
            embeddings = list_to_numpy(rows, len(rows[0]))
            with torch.no_grad():
                inputs = torch.from_numpy(embeddings).to(self.device)
                probabilities[good] = self.model.predict(inputs).float().cpu().numpy()
            if self.centres is not None:
                distance[good] = centre_distances(embeddings, probabilities[good].argmax(1), self.centres)
        return with_labels(batch, probabilities, self.version, distance)


def with_labels(batch: pa.Table, probabilities: np.ndarray, version: str, distance: np.ndarray) -> pa.Table:
    """``distance``: NaN (stored as null) where a row has no centre to measure from."""
    n = batch.num_rows
    return (batch.append_column("cluster", pa.array(probabilities.argmax(1), pa.int32()))
            .append_column("confidence", pa.array(probabilities.max(1), pa.float32()))
            .append_column("distance", pa.array(distance, pa.float32(), from_pandas=True))
            .append_column("model_version", pa.array([version] * n, pa.string()))
            .append_column("labeled_at", pa.array([int(time.time() * 1e6)] * n, pa.timestamp("us", tz="UTC")))
            .append_column(DUPLICATE_OF, pa.nulls(n, pa.string())))  # infer's pass over the whole table fills it


FEATURE_BATCH_ROWS = 1024  # rows per labelling batch of a feature model: [1,024, feature dim] is small


def labeler_stage(model: torch.nn.Module, latest: dict, batch_size: int, centres: np.ndarray) -> Stage:
    return Stage(Labeler, batch_size=batch_size, num_cpus=LABELER_CPUS, num_gpus=labeler_gpus(), actors=labeler_pool(),
                 kwargs={"model": model, "latest": latest, "threads": 1, "centres": centres})


def infer(lake_uri: str, batch_size: int | None = None, evaluate: bool = True, redo: bool = False,
          vocabulary: str | None = None, duplicate_epsilon: float = DEFAULT_EPSILON) -> InferSummary:
    """Label every feature row with the LATEST model (shards it already labelled from the same
    features are skipped unless ``redo``), mark near-duplicates (``rayclust.duplicates``, at cosine
    similarity >= 1 - ``duplicate_epsilon``; 0: none) and describe its clusters (names from
    ``vocabulary``, a file, or the encoder's default); ``evaluate`` prints ACC/NMI/ARI on a
    bounded sample. ``batch_size`` None: ``FEATURE_BATCH_ROWS`` feature rows, or as many images as
    an image model trained on per step (a network's activations, not its input, fill the memory:
    1,024 images of 128 px through EfficientNet-Lite0 took 6.5 GB)."""
    words = read_vocabulary(vocabulary) if vocabulary else None
    lake = Lake.open(lake_uri)
    latest = latest_model(lake)
    description = checkpoint_description(lake, latest)
    model = load_model(lake, latest)  # once, here: a damaged model fails in one line; the labelers get it
    if is_image_model(description["model_config"]):
        return infer_images(lake, model, latest, description, batch_size or description["model_config"]["batch_size"],
                            evaluate)
    batch_size = batch_size or FEATURE_BATCH_ROWS
    features = lake.newest_files(FEATURES)
    if not features:
        raise UserError(f"no features in {lake.uri}: run jobs/embed.py first")
    encoder = feature_encoder(lake, features)
    check_vocabulary_fits(encoder, words)
    with LakeLock(lake, "infer") as lock:
        init_ray()
        require_shared(lake.uri, "lake")
        centres = sample_centres(lake, features, model, latest["clusters"])
        summary, label_files = infer_locked(lake, lock, model, latest, features, batch_size, redo, centres.unit)
        print(summary, flush=True)
        duplicates = find_duplicates(lake, lock, label_files, features, duplicate_epsilon, LABEL_COLUMNS,
                                     latest["clusters"],
                                     duplicate_buckets(lake, label_files, centres, latest["clusters"]))
        label_files = duplicates.label_files
        described = describe_clusters(lake, latest, encoder, centres, list(label_files.values()), words)
    print(duplicates_line(duplicates, described), clusters_line(lake, latest, described),
          health_of_clusters(described), sep="\n", flush=True)
    summary.failures = {**(summary.failures or {}), **duplicates.failures}
    report = evaluate_labels(lake, latest["clusters"], features, label_files) if evaluate else None
    if report:
        print(report, flush=True)
    return summary


def duplicate_buckets(lake: Lake, label_files: dict[str, str], centres: Centres, clusters: int) -> Buckets:
    """The clusters too large for one task of the near-duplicate pass, cut into buckets; a table the
    sample holds whole has none, and is not counted again."""
    if centres.whole_table:
        return Buckets()
    sizes = label_counts(lake, list(label_files.values()), clusters).sizes
    return cluster_buckets(sizes, centres.sample, centres.assigned)


def feature_encoder(lake: Lake, features: dict[str, str]) -> str:
    """The encoder spec the feature table was made with (files: shard -> path)."""
    return read_sample(lake, features, ["encoder"], 1).column("encoder")[0].as_py()


def duplicates_line(duplicates: DuplicatePass, described: list[ClusterDescription]) -> str:
    return duplicates.line(sum(d.duplicates for d in described), sum(d.size for d in described))


def clusters_line(lake: Lake, latest: dict, described: list[ClusterDescription]) -> str:
    named = [d.name for d in sorted(described, key=lambda d: -d.size) if d.names.name][:5]
    line = f"clusters of {latest['model_version']}: {lake.path(*clusters_file(latest['model_version']))}"
    return line + (f" (largest: {', '.join(named)})" if named else " (numbered: the encoder names nothing)")


def infer_locked(lake: Lake, lock: LakeLock, model: torch.nn.Module, latest: dict, features: dict[str, str],
                 batch_size: int, redo: bool, centres: np.ndarray) -> tuple[InferSummary, dict[str, str]]:
    """The summary, and each shard's label file after the run (shard -> path)."""
    started, write_id = time.time(), new_write_id()
    lake.discard_staging(keep=write_id)
    fingerprints = {s: {LABELS: labels_fingerprint(latest["model_version"], path)} for s, path in features.items()}
    label_files = lake.newest_files(LABELS)
    labelled = {} if redo else {s: fingerprint_of(p) for s, p in label_files.items()}
    todo = [s for s in features if labelled.get(s) != fingerprints[s][LABELS]]
    print(f"infer {len(features)} shards of {lake.uri} with {latest['model_version']}: "
          f"{len(todo)} to label", flush=True)
    committed = label_shards(lake, lock, model, latest, [features[s] for s in todo], batch_size, write_id,
                             fingerprints, centres) if todo else CommitSummary()
    label_files.update({s: published_path(lake, LABELS, s, write_id, fingerprints[s][LABELS])
                        for s in committed.published})
    return InferSummary(latest["model_version"], committed.shards, committed.rows, time.time() - started,
                        len(features) - len(todo), committed.failures), label_files


def label_shards(lake: Lake, lock: LakeLock, model: torch.nn.Module, latest: dict, files: list[str],
                 batch_size: int, write_id: str, fingerprints: dict[str, dict[str, str]],
                 centres: np.ndarray) -> CommitSummary:
    rows = ray.data.read_datasource(FeatureFileReader(files, ["key", "source", "embedding"], filesystem=lake.arrow_fs),
                                    num_cpus=READ_CPUS)
    writer = Stage(write_pieces, num_cpus=WRITE_CPUS, kwargs={"lake": lake, "write_id": write_id, "stage": "infer",
                                                        "outputs": (Output(LABELS, LABEL_COLUMNS),)})
    records = run(rows, labeler_stage(model, latest, batch_size, centres), writer)
    return commit_as_shards_finish(records, lake, write_id, (LABELS,), LABELS, Progress("infer", len(files)),
                                   fingerprints, before_publish=lock.check)


def evaluate_labels(lake: Lake, clusters: int, features: dict[str, str],
                    label_files: dict[str, str]) -> QualityReport | None:
    """ACC/NMI/ARI of the labels beside k-means, on the first EVAL_ROWS labelled rows of the
    feature files (read file by file: the same cost for any size of lake); files are shard -> path."""
    from rayclust.evaluation import EVAL_ROWS, compare_with_kmeans, kmeans_baseline  # scikit-learn: driver only

    truth = read_sample(lake, features, ["key", "label"], EVAL_ROWS, with_shard=True)
    truth = truth.filter(pc.is_valid(truth.column("label")))
    if truth.num_rows == 0:
        return None
    shards = [s for s in pc.unique(truth.column("shard")).to_pylist() if s in label_files]
    labels = pa.concat_tables([pq.read_table(label_files[s], columns=["key", "cluster"], filesystem=lake.arrow_fs)
                               for s in shards]) if shards else None
    if labels is None:
        return None
    rows = pa.table({"key": truth.column("key"), "row": np.arange(truth.num_rows)})
    joined = rows.join(labels, "key", join_type="inner")
    truth = truth.take(joined.column("row"))
    return compare_with_kmeans("rayclust labels", truth.column("label").to_numpy(),
                               joined.column("cluster").to_numpy(), kmeans_baseline(lake, features, clusters))


class ImageLabeler(Labeler):
    """Actor: labels batches of clean images (``views.clean_images``); rows that failed keep their error."""

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        good = batch["error"] == ""
        probabilities = np.zeros((len(good), self.clusters), np.float32)
        if good.any():
            pixels = torch.from_numpy(batch["pixels"][good]).to(self.device).float()
            with torch.no_grad():
                probabilities[good] = self.model.predict(pixels).float().cpu().numpy()
        rows = pa.table({"key": pa.array(batch["key"], pa.string()), "shard": pa.array(batch["shard"], pa.string()),
                         "source": pa.array([s or None for s in batch["source"]], pa.string()),
                         "error": pa.array([e or None for e in batch["error"]], pa.string()),
                         "shard_rows": pa.array(batch["shard_rows"], pa.int64())})
        return with_labels(rows, probabilities, self.version, np.full(len(good), np.nan, np.float32))


def infer_images(lake: Lake, model: torch.nn.Module, latest: dict, description: dict, batch_size: int,
                 evaluate: bool) -> InferSummary:
    """Label every image of the shards an image model trained on (recorded in its checkpoint).

    Re-running replaces those shards' labels and errors partitions; errors here come from the
    same decoding as the embed stage's, so they list the same bad samples.
    """
    uris = expand_shards(description["shards"])
    with LakeLock(lake, "infer") as lock:
        init_ray()
        require_shared(lake.uri, "lake")
        started, write_id = time.time(), new_write_id()
        lake.discard_staging(keep=write_id)
        writer = Stage(write_pieces, num_cpus=WRITE_CPUS, kwargs={"lake": lake, "write_id": write_id, "stage": "infer",
                                                            "outputs": (Output(LABELS, LABEL_COLUMNS),)})
        records = run(read_shards(uris),
                      Stage(clean_images, batch_size=ROWS_PER_BLOCK,
                            kwargs={"image_size": description["model_config"]["image_size"]}),
                      Stage(ImageLabeler, batch_size=batch_size, batch_format="numpy", num_gpus=labeler_gpus(),
                            actors=encoder_pool(), kwargs={"model": model, "latest": latest, "threads": 1}),
                      writer)
        committed = commit_as_shards_finish(records, lake, write_id, (LABELS, ERRORS), LABELS,
                                            Progress("infer", len(uris)), before_publish=lock.check)
    summary = InferSummary(latest["model_version"], committed.shards, committed.rows, time.time() - started,
                           failures=committed.failures)
    print(f"{summary}; {committed.bad} bad samples recorded in errors/", flush=True)
    names = {shard_name(uri) for uri in uris}
    print(label_health(lake, {s: p for s, p in lake.newest_files(LABELS).items() if s in names}, latest["clusters"]),
          flush=True)
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
    from rayclust.evaluation import EVAL_ROWS, QualityReport, cluster_metrics  # scikit-learn: only the driver

    pairs = list(itertools.islice(labelled_samples(uris), EVAL_ROWS))
    if not pairs:
        return None
    truth = pa.table({"key": pa.array([k for k, _ in pairs], pa.string()),
                      "label": pa.array([label for _, label in pairs], pa.int64())})
    label_files = lake.newest_files(LABELS)
    shards = sorted({shard_name(u) for u in uris} & set(label_files))
    labels = pa.concat_tables([pq.read_table(label_files[s], columns=["key", "cluster"], filesystem=lake.arrow_fs)
                               for s in shards])
    joined = truth.join(labels, "key", join_type="inner")
    return QualityReport(joined.num_rows, {"rayclust labels": cluster_metrics(
        joined.column("label").to_numpy(), joined.column("cluster").to_numpy())})
