"""GPU embed: images/s of ``jobs/embed.py`` with ViT-B/32 on 256-px JPEG shards, and GPU use.

Writes ``--shards`` x ``--per-shard`` synthetic 256-px JPEGs (``rayclust.synthetic``, in
parallel) to a local temporary folder, then runs ``jobs/embed.py --encoder
open_clip:ViT-B-32:none`` (random weights: throughput does not depend on them) as a subprocess
with its own local Ray (one encoder actor per GPU), once per ``--views`` value, into a fresh
local lake each time. While the job runs, ``nvidia-smi`` is sampled every 0.5 s (utilisation %,
memory used).

Reported per run: images/s end to end (process start to exit) and after start-up (the job's own
summary, which starts after ``ray.init``), both also per GPU; GPU utilisation mean/max over the
job (samples at 0 % during start-up included) and over the samples where it was busy; peak GPU
memory; peak RSS of the job's process tree.

Goal: >= 2,500 images/s per GPU after start-up (clip-retrieval reaches about 2,500 img/s with
ViT-B/32 on one A100), counting images, not views: with V augmented views each image is
encoded 1 + V times.

    python benchmarks/gpu_embed.py                                   # 50 x 1,000 images, views 0 and 2
    python benchmarks/gpu_embed.py --views 2 --batch-size 512
    python benchmarks/gpu_embed.py --allow-cpu --shards 1 --per-shard 16 --views 1 \\
        --encoder open_clip:rayclust-tiny-vit:none                  # dry run without a GPU
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, header, mib, run_monitored, table, write_shards_parallel  # noqa: E402

GOAL = 2500.0
SUMMARY = re.compile(r"embedded (\d+) samples from \d+ shards in ([\d.]+)s")
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]


@dataclass
class GpuSampler:
    """``nvidia-smi`` every ``interval`` s in a thread: (utilisation %, MiB used) summed over GPUs
    for memory and averaged over GPUs for utilisation."""

    interval: float = 0.5
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "GpuSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=5).stdout
                gpus = [tuple(float(x) for x in line.split(",")) for line in out.strip().splitlines() if line]
                if gpus:
                    self.samples.append((sum(g[0] for g in gpus) / len(gpus), sum(g[1] for g in gpus)))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return  # no nvidia-smi (CPU dry run): nothing to sample
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        if not self.samples:
            return {"GPU util mean %": "-", "GPU util max %": "-", "util when busy %": "-", "GPU MiB max": "-"}
        util = [u for u, _ in self.samples]
        busy = [u for u in util if u > 0] or [0.0]
        return {"GPU util mean %": sum(util) / len(util), "GPU util max %": max(util),
                "util when busy %": sum(busy) / len(busy), "GPU MiB max": max(m for _, m in self.samples)}


def gpu_count(allow_cpu: bool) -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    if not allow_cpu:
        raise SystemExit("gpu_embed: no CUDA GPU (torch.cuda.is_available() is false): nothing measured "
                         "(--allow-cpu runs a CPU dry run of the harness)")
    return 0


def run_once(args, shards: str, lake: Path, views: int, gpus: int) -> dict:
    command = [PYTHON, "jobs/embed.py", "--shards", shards, "--lake", str(lake), "--encoder", args.encoder,
               "--views", str(views), "--batch-size", str(args.batch_size)]
    print(f"views {views}: {' '.join(command[1:])}", flush=True)
    with GpuSampler() as sampler:
        done = run_monitored(command, echo=args.echo, interval=1.0)
    match = SUMMARY.search(done.output)
    if not match:
        raise SystemExit(f"gpu_embed: could not parse the job summary:\n{done.output[-2000:]}")
    images, job_seconds = int(match.group(1)), float(match.group(2))
    per = max(gpus, 1)
    row = {"views": views, "images": images, "wall s": done.seconds, "img/s end to end": images / done.seconds,
           "job's own s": job_seconds, "img/s after start-up": images / job_seconds,
           "img/s/GPU after start-up": images / job_seconds / per, **sampler.summary(),
           "tree RSS MiB": mib(done.memory.peak_rss)}
    print(f"  {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=50, help="shards to write (default: %(default)s)")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="embed --batch-size (default: %(default)s)")
    parser.add_argument("--views", type=int, nargs="+", default=[0, 2],
                        help="augmented views per image, one run each (default: %(default)s)")
    parser.add_argument("--encoder", default="open_clip:ViT-B-32:none", help="encoder spec (default: %(default)s)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU: a dry run of the harness")
    parser.add_argument("--echo", action="store_true", help="echo the job's output")
    args = parser.parse_args()

    gpus = gpu_count(args.allow_cpu)
    header("GPU embed: jobs/embed.py images/s and GPU utilisation")
    print(f"{gpus} GPU(s); encoder {args.encoder}; {args.shards} shards x {args.per_shard} {args.size}-px JPEGs; "
          f"batch {args.batch_size}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="rayclust-gpu-embed-") as workdir:
        started = time.perf_counter()
        uris = write_shards_parallel(f"{workdir}/raw", args.shards, args.per_shard, size=args.size)
        print(f"wrote {len(uris)} shards in {time.perf_counter() - started:.1f}s", flush=True)
        pattern = f"{workdir}/raw/part-{{000000..{args.shards - 1:06d}}}.tar"
        rows = [run_once(args, pattern, Path(workdir) / f"lake-v{v}", v, gpus) for v in args.views]
    print()
    print(table(rows))
    if gpus:
        worst = min(r["img/s/GPU after start-up"] for r in rows)
        print(f"\ngoal: >= {GOAL:.0f} images/s per GPU after start-up: {'MET' if worst >= GOAL else 'MISSED'} "
              f"(worst {worst:.0f})")
    else:
        print("\nCPU dry run: no GPU, the goal is not checked")


if __name__ == "__main__":
    main()
