"""Train throughput: ``jobs/train.py`` (Ray Train, 1 worker) vs. a plain PyTorch loop.

Same data (a feature table in a lake; by default built from the real CIFAR-10 effnet-lite0
features in ``shared/data/cifar10-test-effnetlite0.npz``, written as the embed job writes
it: one Hive partition and one Parquet file per 1,000-row shard, ``quality.build_lake``), same model (the
library's ``build_model`` of the ``--model`` config), same loss, optimizer, batch size and
torch threads (the job's single worker on 2 CPUs gets 1 CPU and 1 torch thread), same training
pairs (each row's views, and with the config's ``neighbours`` one of its nearest rows mined by
``rayclust.neighbours.nearest_rows`` over the whole table; ``view_pair``).

The plain loop reads the table once into memory (as a plain PyTorch script would), mines the
neighbours in-process and shuffles indices each epoch. Both report samples/s per epoch over the training loop only
(the job prints it per epoch); steady state = mean of the epochs after the first. Memory: the peak
of each process tree, as a sum of RSS (shared pages counted once per process that maps them) and
as a sum of PSS (shared pages divided among those processes).

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --lake /path/to/lake --epochs 6

Goals: job samples/s >= 0.8 x plain loop samples/s (steady state); job peak memory <= 1.5 x the plain loop's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_FEATURES, PYTHON, REPO, epoch_lines, header, mib, run_monitored, table  # noqa: E402
from quality import build_lake  # noqa: E402

GOAL = 0.8


def plain_loop(args) -> None:
    """Child process: the plain PyTorch loop. Prints one JSON line with per-epoch samples/s."""
    started = time.perf_counter()
    sys.path.insert(0, str(REPO))
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(args.threads)
    from rayclust.lake import FEATURES, Lake, list_to_numpy
    from rayclust.losses import contrastive_clustering_loss
    from rayclust.models import build_model, model_config
    from rayclust.neighbours import nearest_rows
    from rayclust.train_loop import view_pair

    files = Lake.open(args.lake).newest_files(FEATURES).values()  # what the job reads
    table = pa.concat_tables(pq.read_table(f, columns=["embedding", "views"]) for f in files)
    config = model_config(args.model)
    dim, k = len(table.column("embedding")[0]), config.get("neighbours", 0)
    clean = list_to_numpy(table.column("embedding"), dim)
    views = torch.from_numpy(np.concatenate(
        [clean[:, None], list_to_numpy(table.column("views"), len(table.column("views")[0]), dim)], axis=1))
    nearest = nearest_rows(clean, k)[0] if k else None
    rows = len(views)
    picks = np.random.default_rng(args.seed)
    loaded = time.perf_counter()
    torch.manual_seed(args.seed)
    model = build_model(config, dim, args.clusters)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    generator = torch.Generator().manual_seed(args.seed + 1000)
    rates = []
    for _ in range(args.epochs):
        model.train()
        epoch_started = time.perf_counter()
        samples = 0
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows - args.batch_size + 1, args.batch_size):  # drop_last
            batch = order[start:start + args.batch_size]
            pairs = {"views": views[batch]}
            if nearest is not None:
                chosen = nearest[batch.numpy(), picks.integers(k, size=len(batch))]
                pairs["neighbour"] = torch.from_numpy(clean[chosen])
            view_a, view_b = view_pair(pairs, generator)
            loss, parts = contrastive_clustering_loss(model(view_a, view_b))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
            samples += len(batch)
        rates.append(samples / (time.perf_counter() - epoch_started))
    print("RESULT " + json.dumps({"rates": rates, "load_seconds": loaded - started, "rows": rows,
                                  "threads": torch.get_num_threads()}), flush=True)


def run_job(args, lake: str) -> dict:
    command = [PYTHON, "jobs/train.py", "--lake", lake, "--model", args.model, "--clusters", str(args.clusters),
               "--epochs", str(args.epochs), "--self-label-epochs", "0", "--batch-size", str(args.batch_size),
               "--workers", "1", "--seed", str(args.seed), "--run", f"bench-{time.time_ns()}"]
    done = run_monitored(command, interval=1.0, echo=args.echo)  # contrastive epochs only, like the plain loop
    rates = [e.samples_per_second for e in epoch_lines(done.output)]
    if len(rates) != args.epochs:
        raise SystemExit(f"expected {args.epochs} epoch lines from the job:\n{done.output[-3000:]}")
    return {"rates": rates, "wall_seconds": done.seconds, "peak_rss_mib": mib(done.memory.peak_rss),
            "peak_pss_mib": mib(done.memory.peak_pss), "other_cores": done.memory.other_cores,
            "cpu_seconds": done.memory.tree_cpu_seconds}


def run_plain(args, lake: str) -> dict:
    command = [PYTHON, __file__, "--plain-child", "--lake", lake, "--model", args.model,
               "--clusters", str(args.clusters), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--seed", str(args.seed)]
    done = run_monitored(command, interval=1.0)
    line = next(l for l in done.output.splitlines() if l.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "wall_seconds": done.seconds,
            "peak_rss_mib": mib(done.memory.peak_rss), "peak_pss_mib": mib(done.memory.peak_pss),
            "other_cores": done.memory.other_cores,
            "cpu_seconds": done.memory.tree_cpu_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default=None,
                        help="lake with a feature table (default: one built from the CIFAR-10 effnet-lite0 npz)")
    parser.add_argument("--model", default="mfavb", help="model config (default: %(default)s)")
    parser.add_argument("--clusters", type=int, default=10, help="clusters K (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs; the first is skipped (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per step (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the plain loop; the job's 1 worker on 2 CPUs uses 1 "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of plain + job runs, alternating order")
    parser.add_argument("--echo", action="store_true", help="echo the job's output")
    parser.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_child:
        plain_loop(args)
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is skipped)")

    header("Train throughput: jobs/train.py (1 worker) vs. plain PyTorch loop")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rayclust-bench-") as workdir:
        lake = args.lake
        if lake is None:
            lake = str(Path(workdir) / "lake")
            build_lake(lake)
            print(f"built a feature table from {CIFAR_FEATURES} in {lake} (one file per 1,000-row shard)")
        print(f"model {args.model}, {args.clusters} clusters, batch size {args.batch_size}, {args.epochs} epochs, "
              f"plain loop torch threads {args.threads}\n", flush=True)
        for i in range(args.repeat):
            order = ["plain", "job"] if i % 2 == 0 else ["job", "plain"]
            results = {}
            for what in order:
                print(f"run {i + 1}: {what} ...", flush=True)
                results[what] = run_plain(args, lake) if what == "plain" else run_job(args, lake)
                print(f"  {results[what]}", flush=True)
            plain, job = results["plain"], results["job"]
            plain_rate, job_rate = statistics.mean(plain["rates"][1:]), statistics.mean(job["rates"][1:])
            rows.append({
                "run": i + 1,
                "plain samples/s": plain_rate,
                "job samples/s": job_rate,
                "job / plain": job_rate / plain_rate,
                "plain epochs": " ".join(f"{r:.0f}" for r in plain["rates"]),
                "job epochs": " ".join(f"{r:.0f}" for r in job["rates"]),
                "job wall s": job["wall_seconds"],
                "peak RSS job / plain": job["peak_rss_mib"] / plain["peak_rss_mib"],
                "peak PSS job / plain": job["peak_pss_mib"] / plain["peak_pss_mib"],
                "other cores plain/job": f"{plain['other_cores']:.2f}/{job['other_cores']:.2f}",
            })
    print()
    print("samples/s = mean of epochs 2..N (the first is skipped); 'epochs' lists every epoch's samples/s;")
    print("'other cores' = mean CPU use of processes outside the measured process tree (contamination)\n")
    print(table(rows))
    worst = min(r["job / plain"] for r in rows)
    print(f"\ngoal: jobs/train.py / plain >= {GOAL}: {'MET' if worst >= GOAL else 'MISSED'} (worst {worst:.2f})")


if __name__ == "__main__":
    main()
