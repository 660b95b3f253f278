"""Samples become features: embeddings of each image and of augmented views of it.

Stages (``rayclust.stages``): CPU tasks decode images and cut the clean and augmented views as
uint8 pixels (``pixel_views``); an actor pool runs the encoder (``Embedder``: GPU when the
cluster has one, with pinned, non-blocking copies and fp16 autocast); ``commit.PieceWriter``
stages the rows and each shard is published as soon as it is complete. Results land in
``LAKE/features/`` (one Parquet file per shard), each row with a small JPEG thumbnail of its image
for the report (``thumbnail``; null with ``thumbnails=False``); bad samples in ``LAKE/errors/``
with a reason.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from rayclust.commit import (CommitSummary, Output, ShardResult, commit_as_shards_finish, file_name, fingerprint_of,
                             publish_shard,
                             write_pieces)
from rayclust.decode import BadSample, decode_image, normalise
from rayclust.encoders import Preprocessing, check_weights_reachable, load_encoder, load_preprocessing, parse_spec
from rayclust.errors import UserError
from rayclust.lake import ERRORS, FEATURES, LABELS, Lake, new_write_id
from rayclust.lock import LakeLock
from rayclust.manifest import SourceShard, list_source
from rayclust.progress import Progress
from rayclust.runtime import DECODE_CPUS, WRITE_CPUS, cluster_gpus, encoder_pool, init_ray, require_shared
from rayclust.shards import ROWS_PER_BLOCK, read_shards, sources_as_numpy
from rayclust.stages import Stage, run

FEATURE_COLUMNS = ("key", "label", "source", "embedding", "views", "encoder", "thumbnail")
THUMBNAIL_PIXELS = 96  # the longer side: a report's contact sheet, not a preview to zoom into
THUMBNAIL_QUALITY = 80
ENCODER_MEMORY = 2 * 2**30  # effnet-lite0's actor peaks at 1.5 GiB on a CPU (Ray Data's memory report)


@dataclass
class EmbedSummary:
    shards: int
    samples: int
    bad_samples: int
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    skipped: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        lines = [
            f"embedded {self.samples} samples from {self.shards} shards in {self.seconds:.1f}s "
            f"({rate:.1f} images/s); {self.bad_samples} bad samples recorded in errors/"
        ]
        if self.skipped:
            lines.append(f"  {self.skipped} shards already embedded with this encoder and views: skipped "
                         f"(--redo embeds them again)")
        lines += [f"  {count:>6}  {reason}" for reason, count in self.reasons.most_common(10)]
        lines += [f"  failed {shard}: {reason}" for shard, reason in sorted(self.failures.items())]
        return "\n".join(lines)


def pixel_views(batch: pa.Table, encoder: str, views: int, thumbnails: bool = True) -> dict[str, np.ndarray]:
    """CPU stage: decode each image and stack its clean view and ``views`` augmented views as uint8;
    with ``thumbnails``, also its thumbnail (JPEG bytes; b"" for none)."""
    preprocessing = cached_preprocessing(encoder)
    size = preprocessing.image_size
    pixels = np.zeros((batch.num_rows, 1 + views, 3, size, size), np.uint8)
    small = np.full(batch.num_rows, b"", dtype=object)  # b"", not None: Ray turns all-None columns into NaN
    errors = batch.column("error").to_pylist()
    for i, data in enumerate(batch.column("image").to_pylist()):
        if errors[i] is not None:
            continue
        try:
            image = decode_image(data)
        except BadSample as exn:
            errors[i] = str(exn)
            continue
        stack = [preprocessing.clean(image)] + [preprocessing.augment(image) for _ in range(views)]
        pixels[i] = torch.stack(stack).numpy()
        if thumbnails:
            small[i] = thumbnail_jpeg(image)
    return {
        "key": batch.column("key").to_numpy(zero_copy_only=False),
        "shard": batch.column("shard").to_numpy(zero_copy_only=False),
        "label": batch.column("label").fill_null(-1).to_numpy(),
        "error": np.array([e or "" for e in errors], dtype=str),  # "" = good; Ray turns all-None columns into NaN
        "shard_rows": batch.column("shard_rows").fill_null(0).to_numpy(),
        "source": sources_as_numpy(batch),
        "pixels": pixels,
        "thumbnail": small,
    }


def thumbnail_jpeg(image: Image.Image) -> bytes:
    """The image shrunk to THUMBNAIL_PIXELS on its longer side, as JPEG bytes."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


@functools.lru_cache(maxsize=4)
def cached_preprocessing(encoder: str) -> Preprocessing:
    return load_preprocessing(encoder)


class Embedder:
    """Actor stage: run the encoder over all views of a batch (fp16 autocast on GPU)."""

    def __init__(self, encoder: str, threads: int):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Ray Data hands over read-only arrays; the pixels are only read, so torch's warning is noise
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = load_encoder(encoder, self.device)
        preprocessing = cached_preprocessing(encoder)
        self.mean, self.std = preprocessing.mean, preprocessing.std

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        pixels = torch.from_numpy(batch["pixels"])
        n, v = pixels.shape[:2]
        good = batch["error"] == ""
        features = np.zeros((n, v, self.encoder.dim), np.float32)
        if good.any():
            features[good] = self._encode(pixels[torch.from_numpy(good)]).reshape(int(good.sum()), v, -1)
        return feature_rows(batch, features, self.encoder.spec)

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> np.ndarray:
        flat = pixels.flatten(0, 1)
        if self.device == "cuda":
            flat = normalise(flat.pin_memory().to(self.device, non_blocking=True), self.mean, self.std)
            with torch.autocast("cuda", dtype=torch.float16):
                out = self.encoder.forward(flat)
        else:
            out = self.encoder.forward(normalise(flat, self.mean, self.std))
        return out.float().cpu().numpy()


def feature_rows(batch: dict[str, np.ndarray], features: np.ndarray, encoder: str) -> pa.Table:
    """Plain Arrow lists (not Ray's tensor type) so Spark and DuckDB read the table as is."""
    n, v, d = features.shape
    label = pa.array(batch["label"], pa.int64())
    embedding = pa.ListArray.from_arrays(np.arange(0, n * d + 1, d, dtype=np.int32), features[:, 0].ravel())
    view_vectors = pa.ListArray.from_arrays(
        np.arange(0, n * (v - 1) * d + 1, d, dtype=np.int32), features[:, 1:].ravel()
    )
    views = pa.ListArray.from_arrays(np.arange(n + 1, dtype=np.int32) * (v - 1), view_vectors)  # v - 1 may be 0
    thumbnails = batch.get("thumbnail", np.full(n, b"", dtype=object))
    sources = batch.get("source", np.full(n, "", dtype=object))
    return pa.table(
        {
            "key": pa.array(batch["key"], pa.string()),
            "shard": pa.array(batch["shard"], pa.string()),
            "label": pc.if_else(pc.equal(label, -1), pa.scalar(None, pa.int64()), label),
            "source": pa.array([s or None for s in sources], pa.string()),
            "embedding": embedding,
            "views": views,
            "encoder": pa.array([encoder] * n, pa.string()),
            "thumbnail": pa.array([t or None for t in thumbnails], pa.binary()),
            "error": pa.array([e or None for e in batch["error"]], pa.string()),
            "shard_rows": pa.array(batch["shard_rows"], pa.int64()),
        }
    )


def embedding_stages(encoder: str, views: int, batch_size: int, thumbnails: bool = True) -> list[Stage]:
    """Decode (CPU tasks) and encode (an actor pool) as stages: shared by embed and refresh.

    The encoder declares its memory, which also keeps Ray from fusing the two into one operator
    on CPU: decoding then runs beside the encoder instead of in front of it in the same process.
    """
    gpus = 1.0 if cluster_gpus() else 0.0
    return [
        Stage(pixel_views, batch_size=ROWS_PER_BLOCK, num_cpus=DECODE_CPUS,
              kwargs={"encoder": encoder, "views": views, "thumbnails": thumbnails}),
        Stage(Embedder, batch_size=batch_size, batch_format="numpy", num_gpus=gpus, memory=ENCODER_MEMORY,
              actors=encoder_pool(), kwargs={"encoder": encoder, "threads": 1}),
    ]


def embed(shards: str, lake_uri: str, encoder: str, views: int = 2, batch_size: int = 256,
          redo: bool = False, thumbnails: bool = True) -> EmbedSummary:
    """Embed every sample of the shards matching ``shards`` into ``LAKE/features/``.

    A shard already embedded from the same source file with the same encoder and views is
    skipped (so a killed run, run again, does only the rest) unless ``redo``; embedding a shard
    replaces its partitions of the features and errors tables. ``thumbnails``: store each image's
    thumbnail beside its features (not part of what makes a shard "already embedded").
    """
    check_embed_settings(encoder, views)
    source = list_source(shards)
    check_weights_reachable(encoder)  # after the shards: a wrong path is named first, whatever the network
    lake = Lake.open(lake_uri, create=True)
    with LakeLock(lake, "embed") as lock:  # taken before Ray starts: a refused job costs seconds
        init_ray()
        require_shared(lake.uri, "lake")
        return embed_locked(lake, lock, source, encoder, views, batch_size, redo, thumbnails)


def check_embed_settings(encoder: str, views: int) -> None:
    spec = parse_spec(encoder)
    if views < 0:
        raise UserError("--views must be 0 or more")
    if spec.kind == "open_clip" and os.path.isfile(spec.pretrained):  # a local checkpoint, not a tag
        init_ray()
        require_shared(spec.pretrained, "encoder checkpoint")


def embed_locked(lake: Lake, lock: LakeLock, source: list[SourceShard], encoder: str, views: int,
                 batch_size: int, redo: bool, thumbnails: bool) -> EmbedSummary:
    started, write_id = time.time(), new_write_id()
    lake.discard_staging(keep=write_id)
    done = set() if redo else embedded_shards(lake, source, encoder, views)
    todo = [s for s in source if s.name not in done]
    print(f"embed {len(source)} shards into {lake.uri}: {len(todo)} to embed, {len(done)} already done", flush=True)
    committed = (embed_shards(lake, lock, todo, encoder, views, batch_size, write_id, thumbnails) if todo
                 else CommitSummary())
    return EmbedSummary(committed.shards, committed.rows, committed.bad, committed.reasons, time.time() - started,
                        len(done), committed.failures)


def embed_shards(lake: Lake, lock: LakeLock, todo: list[SourceShard], encoder: str, views: int, batch_size: int,
                 write_id: str, thumbnails: bool, extra: tuple[Stage, ...] = (), outputs: tuple[Output, ...] = (),
                 on_published: Callable[[ShardResult], None] = lambda result: None,
                 labelled_by: str | None = None) -> CommitSummary:
    """Run the embedding pipeline (plus ``extra`` stages and ``outputs``: refresh's labels, by
    model ``labelled_by``) over ``todo`` and publish each shard's files as soon as it is complete."""
    fingerprints = {s.name: shard_fingerprints(s, encoder, views, write_id, labelled_by) for s in todo}
    tables = (Output(FEATURES, FEATURE_COLUMNS), *outputs)
    writer = Stage(write_pieces, num_cpus=WRITE_CPUS,
                   kwargs={"lake": lake, "write_id": write_id, "outputs": tables, "stage": "embed"})
    records = run(read_shards([s.uri for s in todo]), *embedding_stages(encoder, views, batch_size, thumbnails),
                  *extra, writer)
    return commit_as_shards_finish(records, lake, write_id, tuple(t.table for t in tables) + (ERRORS,), FEATURES,
                                   Progress("embed", len(todo)), fingerprints, before_publish=lock.check,
                                   on_published=on_published)


def source_fingerprint(shard: SourceShard, encoder: str, views: int) -> str:
    """What a shard's features are made of: its source file as listed, the encoder and the views."""
    identity = f"{shard.uri}|{shard.size}|{shard.etag or shard.mtime}|{encoder}|{views}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def shard_fingerprints(shard: SourceShard, encoder: str, views: int, write_id: str,
                       labelled_by: str | None) -> dict[str, str]:
    """The fingerprint of each table a shard's embedding writes (``commit.publish_shard``)."""
    features = source_fingerprint(shard, encoder, views)
    names = {FEATURES: features, ERRORS: features}
    if labelled_by:
        names[LABELS] = labels_fingerprint(labelled_by, file_name(write_id, features))
    return names


def labels_fingerprint(model_version: str, features_file: str) -> str:
    """What a shard's labels are made of: the model and the features file they label."""
    identity = f"{model_version}|{features_file.rsplit('/', 1)[-1]}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def embedded_shards(lake: Lake, source: list[SourceShard], encoder: str, views: int) -> set[str]:
    """The shards of ``source`` whose features were made from the same file, encoder and views."""
    published = {shard: fingerprint_of(path) for shard, path in lake.newest_files(FEATURES).items()}
    return {s.name for s in source if published.get(s.name) == source_fingerprint(s, encoder, views)}


def write_feature_arrays(lake: Lake, shard: str, keys: np.ndarray, labels: np.ndarray | None,
                         clean: np.ndarray, views: np.ndarray, encoder: str) -> None:
    """Write precomputed features [N, D] and views [N, V, D] as one shard of the feature table.

    For features computed elsewhere (benchmarks, imports); replaces the shard's partition.
    """
    features = np.concatenate([clean[:, None], views], axis=1).astype(np.float32)
    batch = {
        "key": keys.astype(str),
        "shard": np.full(len(keys), shard),
        "label": np.full(len(keys), -1) if labels is None else labels.astype(np.int64),
        "error": np.full(len(keys), ""),
        "shard_rows": np.zeros(len(keys), np.int64),
    }
    write_id = new_write_id()
    records = write_pieces(feature_rows(batch, features, encoder), lake, write_id,
                           (Output(FEATURES, FEATURE_COLUMNS),), "import")
    pieces = [r for r in records.to_pylist() if r["path"]]
    publish_shard(lake, write_id, shard, {FEATURES: [r["path"] for r in pieces]},
                  {FEATURES: sum(r["rows"] for r in pieces)}, [FEATURES])
