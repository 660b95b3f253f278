"""Samples become features: CLIP-style embeddings of each image and of augmented views of it.

Two Ray Data stages: CPU tasks decode images (PIL, in our code) and build the clean and
augmented views; an actor pool (one actor per GPU, else CPU actors) runs the encoder.
Results land in ``LAKE/features/`` (Parquet, Hive-partitioned by shard); bad samples
land in ``LAKE/errors/`` with a reason.
"""
from __future__ import annotations

import functools
import io
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, UnidentifiedImageError
from ray.data import ActorPoolStrategy

from rayclust.encoders import Preprocessing, load_encoder, load_preprocessing, parse_spec
from rayclust.lake import ERRORS, FEATURES, Lake, PartitionedSink, Write
from rayclust.runtime import cluster_gpus, encoder_actor_count, init_ray
from rayclust.shards import expand_shards, read_shards, shard_name

MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class BadSample(Exception):
    """A sample that is skipped and recorded, never a reason to fail the job."""


@dataclass
class EmbedSummary:
    shards: int
    samples: int
    bad_samples: int
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    samples_by_shard: Counter = field(default_factory=Counter)
    bad_by_shard: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        rate = self.samples / self.seconds if self.seconds else 0.0
        lines = [
            f"embedded {self.samples} samples from {self.shards} shards in {self.seconds:.1f}s "
            f"({rate:.1f} images/s); {self.bad_samples} bad samples recorded in errors/"
        ]
        lines += [f"  {count:>6}  {reason}" for reason, count in self.reasons.most_common(10)]
        return "\n".join(lines)


def decode_image(data: bytes) -> Image.Image:
    """RGB image from untrusted bytes, or BadSample saying why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadSample(f"image too large: {width}x{height} pixels")
            image.load()
            return image.convert("RGB")
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:  # Image.open checks first
        raise BadSample(f"image too large: {exn}") from None
    except UnidentifiedImageError:
        raise BadSample("not an image: PIL cannot identify the format") from None
    except Exception as exn:  # PIL raises many types on hostile input; all mean "not an image"
        raise BadSample(f"undecodable image: {type(exn).__name__}: {exn}") from None


def make_views(batch: pa.Table, encoder: str, views: int) -> dict[str, np.ndarray]:
    """CPU stage: decode each image and stack its clean view and ``views`` augmented views."""
    preprocessing = cached_preprocessing(encoder)
    size = preprocessing.image_size
    pixels = np.zeros((batch.num_rows, 1 + views, 3, size, size), np.float16)
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
    return {
        "key": batch.column("key").to_numpy(zero_copy_only=False),
        "shard": batch.column("shard").to_numpy(zero_copy_only=False),
        "label": batch.column("label").fill_null(-1).to_numpy(),
        "error": np.array([e or "" for e in errors], dtype=str),  # "" = good; Ray turns all-None columns into NaN
        "pixels": pixels,
    }


@functools.lru_cache(maxsize=4)
def cached_preprocessing(encoder: str) -> Preprocessing:
    return load_preprocessing(encoder)


class Embedder:
    """Actor stage: run the encoder over all views of a batch (fp16 autocast on GPU)."""

    def __init__(self, encoder: str, threads: int):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = load_encoder(encoder, self.device)

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
        flat = pixels.flatten(0, 1).to(self.device)
        if self.device == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                out = self.encoder.forward(flat)
        else:
            out = self.encoder.forward(flat.float())
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
    return pa.table(
        {
            "key": pa.array(batch["key"], pa.string()),
            "shard": pa.array(batch["shard"], pa.string()),
            "label": pc.if_else(pc.equal(label, -1), pa.scalar(None, pa.int64()), label),
            "embedding": embedding,
            "views": views,
            "encoder": pa.array([encoder] * n, pa.string()),
            "error": pa.array([e or None for e in batch["error"]], pa.string()),
        }
    )


def embed(shards: str, lake_uri: str, encoder: str, views: int = 2, batch_size: int = 64) -> EmbedSummary:
    """Embed every sample of the shards matching ``shards`` into ``LAKE/features/``.

    Re-embedding a shard replaces its partitions of the features and errors tables.
    """
    parse_spec(encoder)
    if views < 1:
        raise ValueError("--views must be at least 1")
    uris = expand_shards(shards)
    return embed_uris(uris, Lake.open(lake_uri, create=True), encoder, views, batch_size)


def embed_uris(uris: list[str], lake: Lake, encoder: str, views: int, batch_size: int) -> EmbedSummary:
    """Embed the shards at ``uris``; each shard's features and errors are published once all are written."""
    init_ray()
    started = time.time()
    write = Write(lake)
    actors = encoder_actor_count()
    gpus = 1 if cluster_gpus() else 0
    dataset = (
        read_shards(uris)
        .map_batches(make_views, fn_kwargs={"encoder": encoder, "views": views},
                     batch_size=batch_size, batch_format="pyarrow")
        .map_batches(Embedder, fn_constructor_kwargs={"encoder": encoder, "threads": 1},
                     batch_size=batch_size, compute=ActorPoolStrategy(size=actors),
                     num_gpus=gpus, num_cpus=1)
    )
    sink = PartitionedSink(lake, FEATURES, stage="embed", write=write)
    dataset.write_datasink(sink)
    write.commit([shard_name(u) for u in uris], [FEATURES, ERRORS])
    return EmbedSummary(len(uris), sink.rows_written, sink.errors_written, sink.reasons, time.time() - started,
                        sink.rows_by_shard, sink.errors_by_shard)


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
    }
    write = Write(lake)
    PartitionedSink(lake, FEATURES, stage="import", write=write).write([feature_rows(batch, features, encoder)], None)
    write.commit([shard], [FEATURES])
