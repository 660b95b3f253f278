"""Scale: how embed, train, infer and refresh grow with the number of shards, on local S3.

For each size S (``--shards``, default 10 100 1000) the script writes S synthetic shards of
``--per-shard`` (100) 32-px JPEGs of 10 classes to a SeaweedFS S3 server it starts itself (data
in a temporary folder, stopped at the end), then runs, as subprocesses with their own local Ray
(the way users run them):

1. ``jobs/embed.py`` with ``open_clip:rayclust-tiny-vit:none`` (the tiny random ViT shipped with
   the repo: the encoder costs little, so what grows with S is the pipeline's own overhead);
2. ``jobs/train.py --model ccmlp --clusters 10 --epochs 1 --self-label-epochs 0 --batch-size 64``
   (the config's 256 exceeds the 1-shard start-up corpus; the same batch at every S);
3. ``jobs/infer.py``;
4. ``jobs/refresh.py`` over all shards after adding ceil(S / 10) new ones. The manifest is
   first seeded with rows for the S original shards (as if an earlier refresh had processed
   them), so refresh skips those and embeds and labels only the new ones.

Per job and S it reports:
- wall time, process start to exit;
- **per-shard time after start-up**: (wall(S) - wall(1)) / (S - 1), where wall(1) is the same
  job on a 1-shard corpus run first (its start-up: process, imports, Ray, actor pools, model
  load, one shard). This definition does not depend on when the job commits its files, so it
  means the same for a job that publishes everything at the end and for one that publishes each
  shard as it finishes. For refresh the divisor is the new shards (the 1-shard baseline
  refreshes 1 new shard). Also shown, for information: the commit span (last minus first
  LastModified of the objects the job published), which is ~0 for an end-of-job commit;
- peak RSS of the driver (the job process) and of its whole process tree (raylet, GCS, workers:
  ``_common.TreeMemory``; the tree sum counts shared pages once per process);
- Parquet files per shard for ``features/`` and ``labels/`` (objects under ``shard=X/`` listed
  after the job): min and max over partitions, and the partition count (goal: exactly 1 each);
- S3 requests per shard: SeaweedFS's ``SeaweedFS_s3_request_total`` (labels bucket, code,
  type), summed over buckets and codes, read before and after the job, divided by the shards
  the job processed (S; the new shards for refresh);
- actor-pool starts: distinct worker processes whose name contained ``Embedder`` / ``Labeler``
  (Ray renames an actor's process after its class; polled every 0.2 s), divided by the pool size
  the job logs, when it does; and the Ray Data executions that ran such an operator (lines of
  the job's output naming the operator, as Ray Data logs each execution's plan).

Goals: per-shard time at the largest S <= 1.2 x at the smallest; driver peak RSS likewise
<= 1.25 x; exactly one file per shard per table; refresh: each actor pool starts once, and its
wall time <= 1.2 x new x (embed + infer per-shard time) + refresh's start-up (its 1-shard wall).

    python benchmarks/scale.py --shards 10 100 1000
    python benchmarks/scale.py --shards 10 --logs /tmp/scale-logs   # keep each job's output
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (PYTHON, REPO, count_difference, header, mib, run_monitored,  # noqa: E402
                     s3_request_counts, table, write_shards_parallel)

sys.path.insert(0, str(REPO))

ENCODER = "open_clip:rayclust-tiny-vit:none"
BUCKET = "scale"
JOBS = ("embed", "train", "infer", "refresh")
TABLES = ("features", "labels")
WRITES = {"embed": ("features",), "train": (), "infer": ("labels",), "refresh": ("features", "labels")}
ACTORS = {"embed": ("Embedder",), "infer": ("Labeler",), "refresh": ("Embedder", "Labeler"), "train": ()}


@dataclass
class JobResult:
    job: str
    shards: int  # what the job processed: S, or the new shards for refresh
    wall: float
    driver_rss: int
    tree_rss: int
    requests: dict[str, int]
    files: dict[str, tuple[int, int, int]]  # table -> (partitions, min files, max files)
    commit_span: float | None
    actor_processes: dict[str, int] = field(default_factory=dict)
    executions: dict[str, int] = field(default_factory=dict)
    other_cores: float = 0.0

    @property
    def requests_total(self) -> int:
        return sum(self.requests.values())


@dataclass
class Corpus:
    size: int
    raw: str
    lake: str
    generate_seconds: float = 0.0
    results: dict[str, JobResult] = field(default_factory=dict)


def s3_fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def shard_files(lake: str, table: str, since: float) -> tuple[tuple[int, int, int], list[float]]:
    """((partitions, min, max files per partition), LastModified of files newer than ``since``)."""
    found = s3_fs().find(f"{lake.removeprefix('s3://')}/{table}", detail=True)
    per_shard: dict[str, int] = {}
    times = []
    for path, info in found.items():
        match = re.search(r"/shard=([^/]+)/[^/]+\.parquet$", path)
        if not match:
            continue
        per_shard[match.group(1)] = per_shard.get(match.group(1), 0) + 1
        modified = info["LastModified"].timestamp()
        if modified >= since - 1:
            times.append(modified)
    counts = list(per_shard.values()) or [0]
    return (len(per_shard), min(counts), max(counts)), times


def executions_with(output: str, actor: str) -> int:
    """Ray Data logs each execution's operator plan once: count the plans naming ``actor``."""
    plans = re.findall(r"^.*(?:Execution plan of Dataset|Executing DAG).*$", output, re.M)
    return sum(actor in line for line in plans)


def run_job(job: str, command: list[str], lake: str, shards: int, metrics_port: int, logs: Path | None,
            label: str, echo: bool) -> JobResult:
    print(f"  {job} ({label}) ...", flush=True)
    before = s3_request_counts(metrics_port)
    started = time.time()
    done = run_monitored(command, echo=echo)
    requests = count_difference(s3_request_counts(metrics_port), before)
    if logs:
        (logs / f"{label}-{job}.log").write_text(done.output)
    files, times = {}, []
    for table_name in TABLES:
        files[table_name], published = shard_files(lake, table_name, started)
        times += published
    result = JobResult(
        job, shards, done.seconds, done.memory.peak_root_rss, done.memory.peak_rss, requests, files,
        max(times) - min(times) if times and job != "train" else None,
        {a: done.memory.processes_named(a) for a in ACTORS[job]},
        {a: executions_with(done.output, a) for a in ACTORS[job]}, done.memory.other_cores)
    print(f"    {result.wall:.1f}s, driver {mib(result.driver_rss):.0f} MiB, tree {mib(result.tree_rss):.0f} MiB, "
          f"S3 {requests}, files {files}, actors {result.actor_processes}, executions {result.executions}",
          flush=True)
    return result


def seed_manifest(lake_uri: str, pattern: str) -> None:
    """Record the original shards in the manifest, as an earlier refresh would have (the first
    refresh after embed and infer would adopt them, reading their footers: a one-off cost)."""
    from rayclust.lake import Lake, new_write_id
    from rayclust.manifest import compact_manifest, list_source, manifest_entry, record_shards
    from rayclust.models.checkpoint import latest_model
    from rayclust.refresh import feature_settings

    lake = Lake.open(lake_uri)
    latest = latest_model(lake)
    encoder, _ = feature_settings(lake, latest)
    record_shards(lake, new_write_id(), [manifest_entry(s, 0, 0, encoder, latest["model_version"])
                                         for s in list_source(pattern)])
    compact_manifest(lake)


def pattern(raw: str, first: int, count: int) -> str:
    return f"{raw}/part-{{{first:06d}..{first + count - 1:06d}}}.tar"


def run_corpus(size: int, args, metrics_port: int) -> Corpus:
    corpus = Corpus(size, f"s3://{BUCKET}/s{size}/raw", f"s3://{BUCKET}/s{size}/lake")
    label = f"S={size}"
    print(f"{label}: writing {size} shards x {args.per_shard} images ...", flush=True)
    started = time.perf_counter()
    write_shards_parallel(corpus.raw, size, args.per_shard, size=32, workers=args.workers)
    corpus.generate_seconds = time.perf_counter() - started
    print(f"  written in {corpus.generate_seconds:.1f}s", flush=True)
    lake, originals = corpus.lake, pattern(corpus.raw, 0, size)
    commands = {
        "embed": ["jobs/embed.py", "--shards", originals, "--lake", lake, "--encoder", ENCODER,
                  "--views", str(args.views)],
        "train": ["jobs/train.py", "--lake", lake, "--model", "ccmlp", "--clusters", "10", "--epochs", "1",
                  "--self-label-epochs", "0", "--batch-size", str(args.train_batch_size), "--run", "scale"],
        "infer": ["jobs/infer.py", "--lake", lake],
    }
    for job, command in commands.items():
        corpus.results[job] = run_job(job, [PYTHON, *command], lake, size, metrics_port, args.logs, label, args.echo)
    new = math.ceil(size / 10)
    write_shards_parallel(corpus.raw, new, args.per_shard, size=32, first=size, workers=args.workers)
    seed_manifest(lake, originals)
    refresh = [PYTHON, "jobs/refresh.py", "--shards", f"{corpus.raw}/*.tar", "--lake", lake]
    corpus.results["refresh"] = run_job("refresh", refresh, lake, new, metrics_port, args.logs, label, args.echo)
    return corpus


def per_shard(result: JobResult, baseline: JobResult) -> float | None:
    if result.shards <= 1:
        return None
    return (result.wall - baseline.wall) / (result.shards - 1)


def job_table(job: str, corpora: list[Corpus], baseline: Corpus) -> str:
    rows = []
    for corpus in [baseline] + corpora:
        r = corpus.results[job]
        shard_time = per_shard(r, baseline.results[job])
        files = " ".join(f"{t[:1]} {n}x{lo}" + (f"-{hi}" if hi != lo else "")
                         for t, (n, lo, hi) in r.files.items() if n)
        rows.append({
            "S": corpus.size if corpus is not baseline else "1 (start-up)",
            "shards done": r.shards,
            "wall s": r.wall,
            "per-shard s": "" if shard_time is None else shard_time,
            "commit span s": "" if r.commit_span is None else r.commit_span,
            "driver MiB": mib(r.driver_rss),
            "tree MiB": mib(r.tree_rss),
            "partitions x files": files or "-",
            "S3 req/shard": r.requests_total / r.shards,
            "S3 by type": " ".join(f"{k} {v}" for k, v in r.requests.items()),
            "actor procs": " ".join(f"{k} {v}" for k, v in r.actor_processes.items()) or "-",
            "executions": " ".join(f"{k} {v}" for k, v in r.executions.items()) or "-",
            "other cores": r.other_cores,
        })
    return table(rows)


def goals(corpora: list[Corpus], baseline: Corpus) -> list[str]:
    small, large = corpora[0], corpora[-1]
    lines = []
    for job in ("embed", "train", "infer") if large is not small else ():
        start = baseline.results[job]
        a, b = per_shard(small.results[job], start), per_shard(large.results[job], start)
        if a is not None and b is not None:
            lines.append(_check(f"{job}: per-shard s at S={large.size} <= 1.2 x at S={small.size}", b, 1.2 * a))
        lines.append(_check(f"{job}: driver peak RSS at S={large.size} <= 1.25 x at S={small.size} (MiB)",
                            mib(large.results[job].driver_rss), 1.25 * mib(small.results[job].driver_rss)))
    for corpus in corpora:
        written = [(job, name, *corpus.results[job].files[name]) for job in JOBS for name in WRITES[job]]
        ok = all(low == high == 1 for *_, low, high in written)
        lines.append(f"S={corpus.size}: files per shard after " + ", ".join(
            f"{job} {name} {low}..{high} over {n} partitions" for job, name, n, low, high in written)
            + f": {'MET' if ok else 'MISSED'} (goal: exactly 1)")
        refresh = corpus.results["refresh"]
        starts = {a: n for a, n in refresh.executions.items()}
        lines.append(f"S={corpus.size} refresh of {refresh.shards} new: actor pools started (executions) {starts}, "
                     f"actor processes {refresh.actor_processes}: "
                     f"{'MET' if all(n == 1 for n in starts.values()) else 'MISSED'} (goal: each pool once)")
        work = sum(per_shard(corpus.results[j], baseline.results[j]) or 0 for j in ("embed", "infer"))
        bound = 1.2 * refresh.shards * work + baseline.results["refresh"].wall
        lines.append(_check(f"S={corpus.size} refresh wall s <= 1.2 x {refresh.shards} new x {work:.2f} s "
                            f"(embed + infer per shard) + {baseline.results['refresh'].wall:.1f} s start-up",
                            refresh.wall, bound))
    return lines


def _check(what: str, value: float, limit: float) -> str:
    return f"{what}: {value:.2f} vs {limit:.2f}: {'MET' if value <= limit else 'MISSED'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[10, 100, 1000],
                        help="corpus sizes S, in shards (default: %(default)s)")
    parser.add_argument("--per-shard", type=int, default=100, help="images per shard (default: %(default)s)")
    parser.add_argument("--views", type=int, default=2, help="augmented views per image (default: %(default)s)")
    parser.add_argument("--train-batch-size", type=int, default=64,
                        help="train --batch-size, the same at every S; at most --per-shard, for the 1-shard "
                             "start-up run (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="processes writing shards (default: CPUs)")
    parser.add_argument("--logs", type=Path, default=None, help="keep each job's output in this folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements to this JSON file")
    parser.add_argument("--echo", action="store_true", help="echo the jobs' output")
    args = parser.parse_args()
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)

    from rayclust.seaweed import SeaweedS3, free_port_pair

    header("Scale: embed, train, infer, refresh vs. corpus size (SeaweedFS S3)")
    print(f"encoder {ENCODER}, 1 clean + {args.views} augmented views, {args.per_shard} 32-px JPEGs per shard, "
          f"sizes {args.shards} (+ 1 for start-up)\n", flush=True)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "rayclust-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rayclust-bench-secret")
    with tempfile.TemporaryDirectory(prefix="rayclust-scale-") as workdir:
        server = SeaweedS3(Path(workdir) / "weed", free_port_pair(), BUCKET)
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint  # for the jobs and this process's s3fs
        server.start()
        try:
            baseline = run_corpus(1, args, server.metrics_port)
            corpora = [run_corpus(size, args, server.metrics_port) for size in args.shards]
        finally:
            server.stop()
    print("\ncorpus generation: " + ", ".join(f"S={c.size} {c.generate_seconds:.0f}s" for c in corpora))
    for job in JOBS:
        print(f"\n## {job}\n")
        print(job_table(job, corpora, baseline))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(c) for c in [baseline] + corpora], indent=1))
    print("\n## goals\n")
    for line in goals(corpora, baseline):
        print(f"- {line}")


if __name__ == "__main__":
    main()
