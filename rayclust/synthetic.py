"""Procedurally drawn image corpora with known classes: real JPEG shards for tests and benchmarks.

Each class is a shape (disc, square, triangle, cross, ring, bars) in a colour family on a
textured background; position, size, hue and noise vary per image, so a clustering model has
something to find and nothing is downloaded.
"""
from __future__ import annotations

import io
import json

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from rayclust.lake import filesystem_for

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bars")


def draw_image(label: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One RGB image of class ``label``: shape ``label % 6`` in hue family ``label // 6``."""
    hue = (label * 0.61803) % 1.0
    base = np.array(_hsv_to_rgb(hue, 0.8, 0.9)) * 255
    background = rng.integers(0, 80, size=3) + rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in np.clip(base + rng.normal(0, 20, 3), 0, 255))
    radius = size * rng.uniform(0.22, 0.38)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    shape = SHAPES[label % len(SHAPES)]
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    elif shape == "cross":
        width = radius / 2.5
        draw.rectangle((cx - width, cy - radius, cx + width, cy + radius), fill=colour)
        draw.rectangle((cx - radius, cy - width, cx + radius, cy + width), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius / 3)))
    else:
        for offset in (-radius, 0.0):
            draw.rectangle((cx - radius, cy + offset, cx + radius, cy + offset + radius / 2), fill=colour)
    return image


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb(h, s, v)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def write_synthetic_shards(out: str, shards: int, per_shard: int, classes: int = 10, size: int = 32,
                           prefix: str = "part", seed: int = 0, first: int = 0) -> list[str]:
    """Write ``out/<prefix>-<first..first+shards-1>.tar`` (local or s3://), each with ``per_shard``
    JPEG samples (``.jpg``, ``.cls``, ``.json``) of classes drawn at random; returns their URIs."""
    fs, root = filesystem_for(out)
    fs.makedirs(root, exist_ok=True)
    scheme = out.split("://", 1)[0] + "://" if "://" in out else ""
    uris = []
    for index in range(first, first + shards):
        rng = np.random.default_rng([seed, index])
        path = f"{root}/{prefix}-{index:06d}.tar"
        with fs.open(path, "wb") as stream, wds.TarWriter(stream) as tar:
            for sample in range(per_shard):
                label = int(rng.integers(classes))
                tar.write({
                    "__key__": f"{prefix}{index:06d}_{sample:05d}",
                    "jpg": jpeg_bytes(draw_image(label, rng, size)),
                    "cls": str(label).encode(),
                    "json": json.dumps({"label": f"class-{label}", "source": f"synthetic/{index}/{sample}"}).encode(),
                })
        uris.append(scheme + path)
    return uris
