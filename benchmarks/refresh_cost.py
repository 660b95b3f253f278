"""Refresh cost: a refresh with N shards processed and 1 new vs. a full refresh of all N + 1.

Setup (timed, not compared): ``jobs/embed.py`` on the first CIFAR shard and ``jobs/train.py``
on its features, so that the lake has a LATEST model. Then, each ``jobs/refresh.py`` as a
subprocess with a fresh local Ray, timed end to end (process start to exit):
1. alone: a source of the first shard only: 1 new, nothing else in the manifest;
2. full: all N shards new (the manifest emptied first);
3. nothing new: all N skipped: the start-up that does not even start Ray;
4. one new: the last shard's manifest row removed, so it is new again and the other N - 1 are
   skipped (refresh re-embeds it and replaces its partitions, as for any new shard).
Claim (issue): one new ~ full / N + a constant start-up. Per-shard work w = (full - one) / (N - 1),
constant = one - w; and "one new" should cost what "alone" costs: the skipped shards add ~nothing.

    python benchmarks/refresh_cost.py                                  # 10 shards, effnet-lite0:96, 1 view
    python benchmarks/refresh_cost.py --encoder open_clip:rayclust-tiny-vit:none
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, REPO, cifar_pattern, header, run_monitored, table  # noqa: E402


def timed(name: str, command: list[str], echo: bool) -> dict:
    print(f"{name} ...", flush=True)
    done = run_monitored(command, echo=echo)
    summary = re.search(r"new +(\d+)\n.*?samples labelled +(\d+).*?time +([\d.]+)s", done.output, re.S)
    row = {"run": name, "wall s": done.seconds, "other cores": done.memory.other_cores}
    if summary:
        row.update({"new shards": int(summary.group(1)), "samples labelled": int(summary.group(2)),
                    "refresh's own s": float(summary.group(3))})
    print(f"  {row}", flush=True)
    return row


def forget(lake: str, keep: int) -> None:
    """Keep the first ``keep`` manifest rows: the next refresh sees the other shards as new."""
    sys.path.insert(0, str(REPO))
    from rayclust.lake import Lake
    from rayclust.manifest import read_manifest, write_manifest

    opened = Lake.open(lake)
    entries = read_manifest(opened)
    write_manifest(opened, {name: entries[name] for name in sorted(entries)[:keep]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10, help="CIFAR shards in the source (default: %(default)s)")
    parser.add_argument("--encoder", default="effnet-lite0:96", help="encoder spec (default: %(default)s)")
    parser.add_argument("--views", type=int, default=1, help="augmented views per image (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="setup training epochs (default: %(default)s)")
    parser.add_argument("--echo", action="store_true", help="echo the jobs' output")
    args = parser.parse_args()

    header("Refresh cost: 1 new shard vs. a full refresh")
    print(f"encoder {args.encoder}, 1 clean + {args.views} augmented views, {args.shards} CIFAR shards "
          f"of 1,000 images\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="rayclust-bench-") as workdir:
        lake = str(Path(workdir) / "lake")

        def refresh(shards: int) -> list[str]:
            return [PYTHON, "jobs/refresh.py", "--shards", cifar_pattern(shards), "--lake", lake]

        setup = [
            timed("setup: embed 1 shard", [PYTHON, "jobs/embed.py", "--shards", cifar_pattern(1), "--lake", lake,
                                           "--encoder", args.encoder, "--views", str(args.views)], args.echo),
            timed("setup: train", [PYTHON, "jobs/train.py", "--lake", lake, "--epochs", str(args.epochs),
                                   "--batch-size", "128", "--run", "bench"], args.echo),
        ]
        alone = timed("alone: 1 new, 0 skipped", refresh(1), args.echo)
        forget(lake, keep=0)
        full = timed(f"full: {args.shards} new", refresh(args.shards), args.echo)
        nothing = timed(f"nothing new: {args.shards} skipped", refresh(args.shards), args.echo)
        forget(lake, keep=args.shards - 1)
        one = timed(f"one new, {args.shards - 1} skipped", refresh(args.shards), args.echo)
    print()
    print(table(setup + [alone, full, nothing, one],
                ["run", "new shards", "samples labelled", "wall s", "refresh's own s", "other cores"]))
    n = args.shards
    per_shard = (full["wall s"] - one["wall s"]) / (n - 1)
    constant = one["wall s"] - per_shard
    print(f"\none new / full = {one['wall s'] / full['wall s']:.3f} (1/N = {1 / n:.3f}); per shard "
          f"{per_shard:.1f}s, constant start-up {constant:.1f}s (of which {nothing['wall s']:.1f}s without Ray); "
          f"one new / alone = {one['wall s'] / alone['wall s']:.2f}")


if __name__ == "__main__":
    main()
