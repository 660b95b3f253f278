"""Embed memory: peak resident memory of ``jobs/embed.py`` at few vs. many shards.

The job runs as a subprocess with a fresh local Ray that it starts itself, so every Ray
process (GCS, raylet + object store, dashboard agents, workers) is a descendant of the job
process. Every ``--interval`` seconds the script sums the RSS (and PSS) of that whole
process tree and keeps the peak.

    python benchmarks/embed_memory.py                       # 2 vs 10 CIFAR shards, effnet-lite0:96

Goal (issue): peak RSS at 10 shards <= 1.25 x peak RSS at 2 shards.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, cifar_pattern, header, mib, run_monitored, table  # noqa: E402

GOAL = 1.25


def run_job(args, shards: int, workdir: str) -> dict:
    lake = Path(workdir) / f"lake-{shards}-{time.time_ns()}"
    command = [PYTHON, "jobs/embed.py", "--shards", cifar_pattern(shards), "--lake", str(lake),
               "--encoder", args.encoder, "--views", str(args.views), "--batch-size", str(args.batch_size)]
    done = run_monitored(command, interval=args.interval, echo=args.echo)
    match = re.search(r"embedded (\d+) samples", done.output)
    memory = done.memory
    # RSS sum at each quarter of the run, to show whether memory grows with the data or plateaus
    quarters = []
    for q in (0.25, 0.5, 0.75, 1.0):
        upto = [rss for t, rss, _, _ in memory.timeline if t <= q * memory.wall_seconds]
        quarters.append(mib(max(upto)) if upto else 0.0)
    return {
        "shards": shards,
        "images": int(match.group(1)) if match else -1,
        "seconds": done.seconds,
        "peak RSS sum (MiB)": mib(memory.peak_rss),
        "peak PSS sum (MiB)": mib(memory.peak_pss),
        "processes": memory.peak_processes,
        "peak RSS by quarter of run (MiB)": " / ".join(f"{q:.0f}" for q in quarters),
        "other cores": memory.other_cores,
        "_at_peak": memory.at_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2, help="shards of the small run (default: %(default)s)")
    parser.add_argument("--large", type=int, default=10, help="shards of the large run (default: %(default)s)")
    parser.add_argument("--encoder", default="effnet-lite0:96", help="encoder spec (default: %(default)s)")
    parser.add_argument("--views", type=int, default=2, help="augmented views per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=0.2, help="polling interval, seconds (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="small/large pairs to run, alternating order")
    parser.add_argument("--echo", action="store_true", help="echo the job's output")
    args = parser.parse_args()

    header("Embed memory: peak RSS of the jobs/embed.py process tree, few vs. many shards")
    print(f"encoder {args.encoder}, views 1 clean + {args.views} augmented, batch size {args.batch_size}, "
          f"polling every {args.interval}s\n", flush=True)
    rows, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="rayclust-bench-") as workdir:
        for i in range(args.repeat):
            order = [args.small, args.large] if i % 2 == 0 else [args.large, args.small]
            results = {}
            for shards in order:
                print(f"run {i + 1}: {shards} shards ...", flush=True)
                results[shards] = run_job(args, shards, workdir)
                print("  RSS of the largest processes at the peak (MiB): " + ", ".join(
                    f"{name} {mib(rss):.0f}" for name, rss, _ in results[shards]["_at_peak"][:8]), flush=True)
            small, large = results[args.small], results[args.large]
            ratio = large["peak RSS sum (MiB)"] / small["peak RSS sum (MiB)"]
            pss_ratio = large["peak PSS sum (MiB)"] / small["peak PSS sum (MiB)"]
            ratios.append(ratio)
            for r in (small, large):
                rows.append({"run": i + 1, **{k: v for k, v in r.items() if not k.startswith("_")}})
            rows.append({"run": i + 1, "shards": f"ratio {args.large}/{args.small}", "peak RSS sum (MiB)": ratio,
                         "peak PSS sum (MiB)": pss_ratio})
    print()
    print(table(rows))
    worst = max(ratios)
    print(f"\ngoal: peak RSS {args.large} shards / {args.small} shards <= {GOAL}: "
          f"{'MET' if worst <= GOAL else 'MISSED'} (worst {worst:.2f})")


if __name__ == "__main__":
    main()
