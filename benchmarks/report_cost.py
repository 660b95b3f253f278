"""What the report and the thumbnails cost.

1. Thumbnails: per image, the CPU time of ``features.thumbnail_jpeg`` beside the rest of the
   embed stage's CPU work on the same decoded image (``pixel_views``: decode, clean view, views),
   and the bytes stored, on the CIFAR-10 shards (32 px) and on the same images scaled to 256 px
   (a photo-sized input; the thumbnail is then 96 px). Measured in one process, so the ratio holds.
2. The report: ``jobs/infer.py`` then ``jobs/report.py`` on the 10-shard CIFAR-10 feature lake
   (the npz's EfficientNet-Lite0 features imported as ``benchmarks/quality.py`` does, so without
   thumbnails; a model trained on it first with ``jobs/train.py``), timed end to end with the
   peak memory of the job's process tree (RSS sum and PSS).

    python benchmarks/report_cost.py [--lake /tmp/report-bench/lake]
"""
from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_SHARDS, PYTHON, REPO, header, mib, run_monitored, table  # noqa: E402

sys.path.insert(0, str(REPO))


def cifar_jpegs(count: int) -> list[bytes]:
    images = []
    for shard in sorted(CIFAR_SHARDS.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith((".jpg", ".png", ".jpeg")):
                    images.append(tar.extractfile(member).read())
                    if len(images) == count:
                        return images
    return images


def scaled(jpegs: list[bytes], size: int) -> list[bytes]:
    from PIL import Image

    out = []
    for data in jpegs:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC).save(buffer, "JPEG",
                                                                                             quality=90)
        out.append(buffer.getvalue())
    return out


def thumbnail_cost(jpegs: list[bytes], encoder: str, views: int) -> dict:
    import pyarrow as pa

    from rayclust.features import pixel_views, thumbnail_jpeg
    from rayclust.decode import decode_image

    batch = pa.table({"key": [str(i) for i in range(len(jpegs))], "shard": ["s"] * len(jpegs),
                      "label": pa.nulls(len(jpegs), pa.int64()), "image": jpegs,
                      "error": pa.nulls(len(jpegs), pa.string()), "shard_rows": pa.nulls(len(jpegs), pa.int64()),
                      "source": pa.nulls(len(jpegs), pa.string())})
    pixel_views(batch.slice(0, 8), encoder, views, thumbnails=False)  # warm the transforms
    started = time.perf_counter()
    pixel_views(batch, encoder, views, thumbnails=False)
    stage = time.perf_counter() - started
    decoded = [decode_image(data) for data in jpegs]
    started = time.perf_counter()
    thumbnails = [thumbnail_jpeg(image) for image in decoded]
    thumbs = time.perf_counter() - started
    n = len(jpegs)
    return {"input px": decoded[0].size[0], "stage ms/img": round(1000 * stage / n, 2),
            "thumbnail ms/img": round(1000 * thumbs / n, 3), "share of stage": f"{thumbs / stage:.1%}",
            "thumbnail bytes": round(sum(map(len, thumbnails)) / n), "source bytes": round(sum(map(len, jpegs)) / n)}


def report_cost(lake: str) -> list[dict]:
    from quality import build_lake

    if not Path(lake, "features").exists():
        build_lake(lake)
        run_monitored([PYTHON, str(REPO / "jobs" / "train.py"), "--lake", lake, "--epochs", "3", "--run", "bench"])
    rows = []
    for job in ("infer.py", "report.py"):
        finished = run_monitored([PYTHON, str(REPO / "jobs" / job), "--lake", lake])
        last = [line for line in finished.output.splitlines() if line.strip()][-1]
        rows.append({"job": job, "seconds": round(finished.seconds, 1),
                     "peak RSS sum MiB": mib(finished.memory.peak_rss),
                     "peak PSS MiB": mib(finished.memory.peak_pss), "last line": last[:90]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default="/tmp/report-bench/lake",
                        help="the CIFAR feature lake, built and trained here when it has no features yet")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--encoder", default="effnet-lite0:96")
    parser.add_argument("--views", type=int, default=2)
    args = parser.parse_args()
    header("thumbnail cost (one process, one thread)")
    import torch

    torch.set_num_threads(1)
    jpegs = cifar_jpegs(args.images)
    print(table([thumbnail_cost(jpegs, args.encoder, args.views),
                 thumbnail_cost(scaled(jpegs, 256), args.encoder, args.views)]))
    header(f"infer + report on {args.lake}")
    print(table(report_cost(args.lake)))


if __name__ == "__main__":
    main()
