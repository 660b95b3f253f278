"""Embed throughput: ``jobs/embed.py`` (Ray Data) vs. a plain single-process PyTorch loop.

Both do the same work per image: decode the JPEG (PIL), build the clean view and
``--views`` augmented views with the library's own ``load_preprocessing``, round the
pixels to float16 as the Ray stage does, and run the library's ``load_encoder`` forward
with one torch thread (the embed job's encoder actor has 1 CPU and 1 torch thread).
The job runs as a subprocess (`python jobs/embed.py ...`) and is timed end to end;
the plain loop runs in its own subprocess too (fresh interpreter, same imports).

    python benchmarks/embed_throughput.py                       # 10 CIFAR shards, effnet-lite0:96
    python benchmarks/embed_throughput.py --encoder open_clip:ViT-B-32:none --shards 1

Goal (issue): job images/s >= 0.8 x plain loop images/s.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, REPO, cifar_pattern, header, mib, run_monitored, table  # noqa: E402

GOAL = 0.8


def plain_loop(args) -> None:
    """Child process: the plain loop. Prints one JSON line with its timings."""
    started = time.perf_counter()
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from rayclust.encoders import load_encoder, load_preprocessing
    from rayclust.decode import BadSample, decode_image, normalise
    from rayclust.shards import expand_shards, samples_of_tar

    preprocessing = load_preprocessing(args.encoder)
    encoder = load_encoder(args.encoder, "cpu")
    ready = time.perf_counter()

    def batches():
        rows = []
        for uri in expand_shards(args.pattern):
            with open(uri, "rb") as stream:
                for row in samples_of_tar(stream, uri):
                    rows.append(row)
                    if len(rows) == args.batch_size:
                        yield rows
                        rows = []
        if rows:
            yield rows

    images = 0
    first_batch_done = None
    outputs = []
    with torch.inference_mode():
        for rows in batches():
            stacks = []
            for row in rows:
                try:
                    image = decode_image(row["image"])
                except (BadSample, KeyError):
                    continue
                views = [preprocessing.clean(image)] + [preprocessing.augment(image) for _ in range(args.views)]
                stacks.append(torch.stack(views))
            pixels = torch.stack(stacks)  # uint8, as the Ray stage ships them
            n, v = pixels.shape[:2]
            inputs = normalise(pixels.flatten(0, 1), preprocessing.mean, preprocessing.std)
            features = encoder.forward(inputs).reshape(n, v, -1)
            outputs.append(features.numpy().astype(np.float32))
            images += n
            if first_batch_done is None:
                first_batch_done, first_images = time.perf_counter(), images
    finished = time.perf_counter()
    print("RESULT " + json.dumps({
        "images": images,
        "setup_seconds": ready - started,
        "loop_seconds": finished - ready,
        "steady_rate": (images - first_images) / (finished - first_batch_done) if images > first_images else 0.0,
        "threads": torch.get_num_threads(),
    }), flush=True)


def job_output_timeline(lake: Path) -> tuple[int, list[int], list[float]]:
    """(total rows, rows per file, file mtimes) of the features the job wrote, oldest first."""
    import pyarrow.parquet as pq

    files = sorted(lake.glob("features/shard=*/*.parquet"), key=lambda p: p.stat().st_mtime)
    rows = [pq.read_metadata(f).num_rows for f in files]
    times = [f.stat().st_mtime for f in files]
    return sum(rows), rows, times


def run_job(args, pattern: str, workdir: Path) -> dict:
    lake = workdir / "lake"
    shutil.rmtree(lake, ignore_errors=True)
    command = [PYTHON, "jobs/embed.py", "--shards", pattern, "--lake", str(lake), "--encoder", args.encoder,
               "--views", str(args.views), "--batch-size", str(args.batch_size)]
    wall_start = time.time()
    done = run_monitored(command, echo=args.echo)
    match = re.search(r"embedded (\d+) samples from \d+ shards in ([\d.]+)s", done.output)
    if not match:
        raise SystemExit(f"could not parse the job summary:\n{done.output[-2000:]}")
    images, job_seconds = int(match.group(1)), float(match.group(2))
    total, rows, times = job_output_timeline(lake)
    # steady state: rows written after the first output file, over the time between first and last file
    steady = (total - rows[0]) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    return {
        "images": images,
        "wall_seconds": done.seconds,
        "job_seconds": job_seconds,
        "first_output_seconds": times[0] - wall_start,
        "steady_rate": steady,
        "files": len(rows),
        "peak_rss_mib": mib(done.memory.peak_rss),
        "peak_pss_mib": mib(done.memory.peak_pss),
        "processes": done.memory.peak_processes,
        "cpu_seconds": done.memory.tree_cpu_seconds,
        "other_cores": done.memory.other_cores,
        "cpu_by_process": [(name, round(seconds)) for name, seconds in done.memory.cpu_by_name(4)],
    }


def run_plain(args, pattern: str) -> dict:
    command = [PYTHON, __file__, "--plain-child", "--pattern", pattern, "--encoder", args.encoder,
               "--views", str(args.views), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    done = run_monitored(command, interval=1.0)  # plain loop: its memory is not a goal
    line = next(l for l in done.output.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    return {**result, "wall_seconds": done.seconds, "peak_rss_mib": mib(done.memory.peak_rss),
            "peak_pss_mib": mib(done.memory.peak_pss), "cpu_seconds": done.memory.tree_cpu_seconds,
            "other_cores": done.memory.other_cores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10, help="CIFAR shards the job embeds (default: %(default)s)")
    parser.add_argument("--plain-shards", type=int, default=None,
                        help="CIFAR shards the plain loop embeds (default: as --shards); rates are images/s")
    parser.add_argument("--encoder", default="effnet-lite0:96", help="encoder spec (default: %(default)s)")
    parser.add_argument("--views", type=int, default=2, help="augmented views per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the plain loop; the job's encoder actor uses 1 (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="job/plain pairs to run, alternating order")
    parser.add_argument("--echo", action="store_true", help="echo the job's output")
    parser.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pattern", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_child:
        plain_loop(args)
        return

    header("Embed throughput: jobs/embed.py vs. plain PyTorch loop")
    job_pattern = cifar_pattern(args.shards)
    plain_pattern = cifar_pattern(args.plain_shards or args.shards)
    print(f"encoder {args.encoder}, views 1 clean + {args.views} augmented, batch size {args.batch_size}, "
          f"plain loop torch threads {args.threads}; job shards {args.shards}, plain shards "
          f"{args.plain_shards or args.shards}\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rayclust-bench-") as workdir:
        for i in range(args.repeat):
            order = ["plain", "job"] if i % 2 == 0 else ["job", "plain"]
            results = {}
            for what in order:
                print(f"run {i + 1}: {what} ...", flush=True)
                results[what] = (run_job(args, job_pattern, Path(workdir)) if what == "job"
                                 else run_plain(args, plain_pattern))
                print(f"  {results[what]}", flush=True)
            job, plain = results["job"], results["plain"]
            plain_e2e = plain["images"] / plain["wall_seconds"]
            job_e2e = job["images"] / job["wall_seconds"]
            plain_loop_rate = plain["images"] / plain["loop_seconds"]
            job_own = job["images"] / job["job_seconds"]
            rows += [
                {"run": i + 1, "what": "end to end (process start to exit)", "plain img/s": plain_e2e,
                 "job img/s": job_e2e, "job / plain": job_e2e / plain_e2e},
                {"run": i + 1, "what": "after setup (plain: after model load; job: its own summary, after ray.init)",
                 "plain img/s": plain_loop_rate, "job img/s": job_own, "job / plain": job_own / plain_loop_rate},
                {"run": i + 1, "what": "steady state (plain: after 1st batch; job: between 1st and last output file)",
                 "plain img/s": plain["steady_rate"], "job img/s": job["steady_rate"],
                 "job / plain": job["steady_rate"] / plain["steady_rate"]},
            ]
            print(f"\nrun {i + 1}: images plain {plain['images']} in {plain['wall_seconds']:.1f}s "
                  f"(setup {plain['setup_seconds']:.1f}s); job {job['images']} in {job['wall_seconds']:.1f}s "
                  f"(job summary {job['job_seconds']:.1f}s, first output after {job['first_output_seconds']:.1f}s, "
                  f"{job['files']} output files); peak RSS of tree: plain {plain['peak_rss_mib']:.0f} MiB, "
                  f"job {job['peak_rss_mib']:.0f} MiB (PSS {job['peak_pss_mib']:.0f} MiB, "
                  f"{job['processes']} processes); CPU seconds: plain {plain['cpu_seconds']:.0f}, "
                  f"job {job['cpu_seconds']:.0f}; other processes' load meanwhile (contamination): "
                  f"{plain['other_cores']:.2f} cores during plain, {job['other_cores']:.2f} during job\n", flush=True)
    print(table(rows))
    worst = min(r["job / plain"] for r in rows if r["what"].startswith("end to end"))
    print(f"\ngoal: end-to-end job / plain >= {GOAL}: {'MET' if worst >= GOAL else 'MISSED'} (worst {worst:.2f})")


if __name__ == "__main__":
    main()
