"""Labels gain ``duplicate_of``: the key of a more typical near-duplicate in the same cluster.

NeMo Curator's semantic dedup, with the model's clusters as the k-means buckets: within a
cluster, rows sorted from typical to odd (``distance`` to the centre, then key), each row points
at the most typical earlier row whose cosine similarity is at least ``1 - epsilon``; a row with
none keeps ``duplicate_of`` null, so every group of near-duplicates keeps its most central one.

The pass is distributed end to end (``find_duplicates``): Ray Data reads each shard's label and
feature files together, groups the rows by cluster (a shuffle), and in each group faiss's range
search finds the pairs: a flat index compares every pair up to ``neighbours.EXACT_MAX_ROWS``
rows; a larger cluster is sub-bucketed by an IVF index that probes a few lists, so a pair split
across lists it does not probe can be missed. The pairs are grouped again by shard, where a task
rewrites the shard's label file (staged under a new write id) only if its ``duplicate_of``
changed, and the driver publishes each one through ``commit.commit_as_shards_finish``: a run
killed mid-way leaves each shard's labels old or new, never lost, and a run again redoes the pass.
A group is held whole by one task, so a cluster of more than MAX_GROUP_ROWS labels is cut into
buckets first (``cluster_buckets``): spherical k-means over its rows in infer's bounded sample, one
bucket per MAX_GROUP_ROWS, each row grouped with its cluster's nearest bucket centre. Near-duplicates
are close enough to share a bucket but for rows right at a cut, which, as in the IVF search, can miss
each other.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from rayclust.clusters import unit_rows
from rayclust.commit import RECORD_SCHEMA, commit_as_shards_finish, fingerprint_of, published_path, stage_piece
from rayclust.lake import LABELS, Lake, list_to_numpy, new_write_id
from rayclust.lock import LakeLock
from rayclust.neighbours import build_index
from rayclust.progress import Progress
from rayclust.runtime import shuffle_partitions, task_shuffles

DEFAULT_EPSILON = 0.05  # NeMo Curator's semantic dedup default
MAX_GROUP_ROWS = 200_000  # rows one task holds for a range search: 200k x 512-d float32 is 400 MB
DUPLICATE_OF = "duplicate_of"
GROUP_COLUMNS = pa.schema([("key", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()),
                           ("bucket", pa.int32()), ("distance", pa.float32()), ("embedding", pa.list_(pa.float32()))])
# one row per pair, plus one per shard (key null) carrying the shard's label file, so that every
# shard is looked at: one whose duplicates are gone must lose them too
PAIR_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("duplicate_of", pa.string()),
                         ("labels", pa.string())])


@dataclass(frozen=True)
class Buckets:
    """The clusters cut for the pass: cluster -> its bucket centres [P, D] (unit rows)."""

    centres: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def groups(self) -> int:
        """Buckets beyond one per cluster."""
        return sum(len(c) - 1 for c in self.centres.values())

    def of(self, clusters: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Each row's bucket in its cluster (0 in a cluster that is not cut): the centre of highest
        cosine similarity, i.e. of highest inner product, whatever the row's length."""
        bucket = np.zeros(len(clusters), np.int32)
        for k, centres in self.centres.items():
            rows = clusters == k
            if rows.any():
                bucket[rows] = np.argmax(embeddings[rows] @ centres.T, axis=1)
        return bucket


def cluster_buckets(sizes: np.ndarray, sample: np.ndarray, assigned: np.ndarray,
                    limit: int = MAX_GROUP_ROWS) -> Buckets:
    """Bucket centres for each cluster of more than ``limit`` labels (``sizes``), from its rows in a
    sample (unit rows ``sample``, their clusters ``assigned``): one bucket per ``limit`` labels."""
    import faiss

    centres = {}
    for k in np.flatnonzero(sizes > limit):
        members = np.ascontiguousarray(sample[assigned == k], np.float32)
        parts = min(-(-int(sizes[k]) // limit), len(members))
        if parts < 2:
            continue
        kmeans = faiss.Kmeans(members.shape[1], parts, niter=20, seed=0, spherical=True, min_points_per_centroid=1)
        kmeans.train(members)
        centres[int(k)] = kmeans.centroids.copy()
    return Buckets(centres)


@dataclass
class DuplicatePass:
    epsilon: float
    seconds: float
    rewritten: int
    label_files: dict[str, str]  # shard -> its label file after the pass
    failures: dict[str, str] = field(default_factory=dict)

    def line(self, duplicates: int, rows: int) -> str:
        share = duplicates / rows if rows else 0.0
        return (f"near-duplicates: {duplicates:,} of {rows:,} labels ({share:.1%}) at cosine similarity >= "
                f"{1 - self.epsilon:g} (epsilon {self.epsilon:g}) in {self.seconds:.1f}s; "
                f"{self.rewritten} shards' labels rewritten"
                + "".join(f"\n  failed {s}: {r}" for s, r in sorted(self.failures.items())))


def more_typical_duplicates(unit: np.ndarray, epsilon: float) -> np.ndarray:
    """For rows of unit vectors sorted from most to least typical: each row's most typical earlier
    row at cosine similarity >= 1 - epsilon, or -1 where there is none."""
    if epsilon <= 0 or len(unit) < 2:
        return np.full(len(unit), -1, np.int64)
    index, _ = build_index(unit)
    # faiss keeps scores strictly above the radius; the nudge keeps those equal to it
    limits, _, found = index.range_search(unit, 1.0 - epsilon - 1e-6)
    query = np.repeat(np.arange(len(unit)), np.diff(limits).astype(np.int64))
    earlier = found < query
    best = np.full(len(unit), len(unit), np.int64)
    np.minimum.at(best, query[earlier], found[earlier])
    return np.where(best < len(unit), best, -1)


def duplicates_in_cluster(group: pa.Table, epsilon: float) -> pa.Table:
    """Ray Data ``map_groups``: one cluster's rows (a bucket's, in a cut cluster) become its pairs (``PAIR_SCHEMA``)."""
    import faiss

    faiss.omp_set_num_threads(1)  # the task holds one CPU
    rows = group.sort_by([("distance", "ascending"), ("key", "ascending")])  # null distance: last
    embeddings = list_to_numpy(rows.column("embedding"), len(rows.column("embedding")[0]))
    found = more_typical_duplicates(unit_rows(embeddings).astype(np.float32), epsilon)
    marked = np.flatnonzero(found >= 0)
    keys = rows.column("key")
    return pa.table([keys.take(marked), rows.column("shard").take(marked), keys.take(found[marked]),
                     pa.nulls(len(marked), pa.string())], schema=PAIR_SCHEMA)


def labelled_embeddings(batch: pa.Table, lake: Lake, buckets: Buckets) -> pa.Table:
    """Ray Data stage: each (shard, labels, features) row becomes the shard's rows to group
    (``GROUP_COLUMNS``), the embedding taken by each label key's row in the feature file."""
    tables = []
    for shard, labels, features in zip(*(batch.column(c).to_pylist() for c in ("shard", "labels", "features"))):
        labelled = pq.read_table(labels, columns=["key", "cluster", "distance"], filesystem=lake.arrow_fs)
        embedded = pq.read_table(features, columns=["key", "embedding"], filesystem=lake.arrow_fs)
        embedding = embedded.column("embedding").take(pc.index_in(labelled.column("key"),
                                                                  value_set=embedded.column("key")))
        bucket = np.zeros(labelled.num_rows, np.int32)
        if buckets.centres and labelled.num_rows:
            bucket = buckets.of(labelled.column("cluster").to_numpy(), list_to_numpy(embedding, len(embedding[0])))
        tables.append(pa.table([labelled.column("key"), pa.array([shard] * labelled.num_rows, pa.string()),
                                labelled.column("cluster"), pa.array(bucket, pa.int32()), labelled.column("distance"),
                                embedding], schema=GROUP_COLUMNS))
    return pa.concat_tables(tables) if tables else GROUP_COLUMNS.empty_table()


def rewrite_labels(group: pa.Table, lake: Lake, write_id: str, columns: tuple[str, ...]) -> pa.Table:
    """Ray Data ``map_groups``: one shard's pairs become its label file with ``duplicate_of``
    filled, staged as a piece, and its records (``commit.RECORD_SCHEMA``); no records where the
    file already says the same."""
    path = pc.drop_null(group.column("labels"))[0].as_py()
    shard = group.column("shard")[0].as_py()
    pairs = group.filter(pc.is_valid(group.column("key")))
    labels = pq.read_table(path, filesystem=lake.arrow_fs)
    found = pairs.column(DUPLICATE_OF).take(pc.index_in(labels.column("key"), value_set=pairs.column("key")))
    if DUPLICATE_OF in labels.column_names and labels.column(DUPLICATE_OF).equals(found):
        return RECORD_SCHEMA.empty_table()
    rows = labels.select([c for c in columns if c != DUPLICATE_OF]).append_column(DUPLICATE_OF, found)
    records = [stage_piece(lake, write_id, LABELS, shard, rows), (None, shard, None, rows.num_rows, None)]
    return pa.table([list(column) for column in zip(*records)], schema=RECORD_SCHEMA)


def find_duplicates(lake: Lake, lock: LakeLock, label_files: dict[str, str], feature_files: dict[str, str],
                    epsilon: float, columns: tuple[str, ...], clusters: int, buckets: Buckets) -> DuplicatePass:
    """Fill ``duplicate_of`` in the label files (shard -> path; each shard's features in
    ``feature_files``) and publish the shards whose column changed; ``columns`` is the label
    file's columns, ``duplicate_of`` among them; ``clusters``: the model's K, the large ones cut
    into ``buckets``. Epsilon 0 only clears earlier duplicates."""
    with task_shuffles():
        return duplicate_pass(lake, lock, label_files, feature_files, epsilon, columns, clusters, buckets)


def duplicate_pass(lake: Lake, lock: LakeLock, label_files: dict[str, str], feature_files: dict[str, str],
                   epsilon: float, columns: tuple[str, ...], clusters: int, buckets: Buckets) -> DuplicatePass:
    started, write_id = time.time(), new_write_id()
    shards = sorted(set(label_files) & set(feature_files))
    files = pa.table({"shard": shards, "labels": [label_files[s] for s in shards],
                      "features": [feature_files[s] for s in shards]})
    every_shard = ray.data.from_arrow(pa.table([pa.nulls(len(shards), pa.string()), files.column("shard"),
                                                pa.nulls(len(shards), pa.string()), files.column("labels")],
                                               schema=PAIR_SCHEMA))
    pairs = every_shard
    if epsilon > 0:
        rows = ray.data.from_arrow(files).map_batches(labelled_embeddings, batch_size=1, batch_format="pyarrow",
                                                     fn_kwargs={"lake": lake, "buckets": buckets}, num_cpus=0.25)
        by_cluster = rows.groupby(["cluster", "bucket"], num_partitions=shuffle_partitions(clusters + buckets.groups))
        pairs = every_shard.union(by_cluster.map_groups(duplicates_in_cluster, batch_format="pyarrow",
                                                        fn_kwargs={"epsilon": epsilon}))
    by_shard = pairs.groupby("shard", num_partitions=shuffle_partitions(len(shards)))
    records = by_shard.map_groups(rewrite_labels, batch_format="pyarrow", num_cpus=0.25,
                                  fn_kwargs={"lake": lake, "write_id": write_id, "columns": columns})
    fingerprints = {s: {LABELS: fingerprint_of(label_files[s])} for s in shards}
    committed = commit_as_shards_finish(records, lake, write_id, (LABELS,), LABELS,
                                        Progress("near-duplicates", len(shards)), fingerprints,
                                        before_publish=lock.check)
    after = dict(label_files)
    after.update({s: published_path(lake, LABELS, s, write_id, fingerprints[s][LABELS]) for s in committed.published})
    return DuplicatePass(epsilon, time.time() - started, committed.shards, after, committed.failures)

