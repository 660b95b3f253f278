"""Images become model inputs: PCLC's weak and strong training views, and the clean view for inference.

Runs in Ray Data CPU tasks over ``SAMPLE_SCHEMA`` batches from ``rayclust.shards``; images are
decoded with ``decode.decode_image`` (bad samples are skipped in training and reported in
inference). Pixels travel as float16 to halve the object store traffic.
"""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from rayclust.encoders import contrastive_augmentation
from rayclust.decode import BadSample, decode_image
from rayclust.shards import sources_as_numpy

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as PCLC normalises
PCLC_SIZE = 224


def weak_view(size: int) -> T.Compose:
    """Contrastive Clustering's augmentation (crop, flip, colour jitter 0.8, grayscale)."""
    return contrastive_augmentation(size, MEAN, STD)


class GaussianBlur:
    """PIL Gaussian blur, sigma uniform in ``sigma``: torchvision's tensor blur cost ~10 ms per 32-px view here."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(torch.empty(1).uniform_(*self.sigma).item()))


def strong_view(size: int) -> T.Compose:
    """PCLC's strong view: crop, jitter 0.4, grayscale, Gaussian blur, flip, RandAugment n=5 m=10.

    PCLC blurs 224-px images with sigma in [0.1, 2]; the range scales with ``size`` so the blur
    removes the same share of detail at any resolution (at 32 px it is slight, as SimCLR's CIFAR
    recipe, which drops blur, suggests).
    """
    scale = size / PCLC_SIZE
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur((0.1 * scale, 2.0 * scale))], p=0.5),
        T.RandomHorizontalFlip(),
        T.RandAugment(num_ops=5, magnitude=10),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def clean_view(size: int) -> T.Compose:
    """Inference input: shorter side resized to ``size``, centre crop, normalised."""
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])


@functools.lru_cache(maxsize=4)
def _transforms(size: int) -> tuple[T.Compose, T.Compose, T.Compose]:
    return weak_view(size), strong_view(size), clean_view(size)


def training_views(batch: pa.Table, image_size: int) -> dict[str, np.ndarray]:
    """CPU stage of training: a weak and a strong view [n, 3, S, S] of every decodable image."""
    weak, strong, _ = _transforms(image_size)
    errors = batch.column("error").to_pylist()
    pairs = []
    for data, error in zip(batch.column("image").to_pylist(), errors):
        if error is not None:
            continue
        try:
            image = decode_image(data)
        except BadSample:
            continue
        pairs.append((weak(image), strong(image)))
    empty = np.zeros((0, 3, image_size, image_size), np.float16)
    return {
        "weak": torch.stack([w for w, _ in pairs]).numpy().astype(np.float16) if pairs else empty,
        "strong": torch.stack([s for _, s in pairs]).numpy().astype(np.float16) if pairs else empty,
    }


def sample_of_images(uris: list[str], count: int, image_size: int, spread: int = 20) -> torch.Tensor:
    """Clean views [n <= count, 3, S, S] of the first decodable images of up to ``spread`` shards
    taken evenly across the list (a class-ordered corpus still shows its classes), the same number
    from each: a bounded read whatever the corpus."""
    from rayclust.lake import filesystem_for
    from rayclust.shards import samples_of_tar

    chosen = uris[::max(1, len(uris) // spread)][:spread]
    per_shard, clean = -(-count // len(chosen)), _transforms(image_size)[2]
    views = []
    for uri in chosen:
        fs, path = filesystem_for(uri)
        taken = 0
        with fs.open(path, "rb") as stream:
            for row in samples_of_tar(stream, path):
                if taken == per_shard or len(views) == count:
                    break
                try:
                    views.append(clean(decode_image(row["image"])))
                    taken += 1
                except (KeyError, BadSample):  # no image member, or one that does not decode
                    continue
    return torch.stack(views) if views else torch.zeros(0, 3, image_size, image_size)


def clean_images(batch: pa.Table, image_size: int) -> dict[str, np.ndarray]:
    """CPU stage of inference: every sample's clean view, or its row's error ("" = good)."""
    _, _, clean = _transforms(image_size)
    pixels = np.zeros((batch.num_rows, 3, image_size, image_size), np.float16)
    errors = batch.column("error").to_pylist()
    for i, data in enumerate(batch.column("image").to_pylist()):
        if errors[i] is not None:
            continue
        try:
            pixels[i] = clean(decode_image(data)).numpy()
        except BadSample as exn:
            errors[i] = str(exn)
    return {
        "key": batch.column("key").to_numpy(zero_copy_only=False),
        "shard": batch.column("shard").to_numpy(zero_copy_only=False),
        "error": np.array([e or "" for e in errors], dtype=str),  # "" = good; Ray turns all-None columns into NaN
        "shard_rows": batch.column("shard_rows").fill_null(0).to_numpy(),
        "source": sources_as_numpy(batch),
        "pixels": pixels,
    }
