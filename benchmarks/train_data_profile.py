"""Where the train job's input pipeline spends time: the Ray Data path of ``rayclust.training``
without the model, epoch by epoch, against an in-memory baseline.

For each variant it iterates ``--epochs`` epochs of batches the way ``train_epoch`` does
(``iter_torch_batches(batch_size, drop_last=True, local_shuffle_buffer_size=4*batch_size)``)
and reports, per epoch, the wall seconds and the CPU seconds spent *in the consuming
process* (the training worker, where that CPU time is taken from the model's step).

    python benchmarks/train_data_profile.py                 # lake built from the CIFAR npz
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_FEATURES, REPO, header, table  # noqa: E402
from train_throughput import build_lake  # noqa: E402


def epochs(iterate, count: int) -> list[tuple[float, float, int]]:
    out = []
    for _ in range(count):
        wall, cpu = time.perf_counter(), time.process_time()
        rows = 0
        for batch in iterate():
            rows += batch["views"].shape[0]
        out.append((time.perf_counter() - wall, time.process_time() - cpu, rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", default=None, help="lake with a feature table (default: built from the npz)")
    parser.add_argument("--npz", default=str(CIFAR_FEATURES))
    parser.add_argument("--rows-per-file", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default: %(default)s)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from rayclust.lake import FEATURES, Lake
    from rayclust.training import training_pairs

    header("Train input pipeline profile (no model)")
    with tempfile.TemporaryDirectory(prefix="rayclust-bench-") as workdir:
        lake_uri = args.lake or str(Path(workdir) / "lake")
        if args.lake is None:
            build_lake(Path(args.npz), Path(lake_uri), args.rows_per_file)
        lake = Lake.open(lake_uri)
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        bs = args.batch_size

        def ray_dataset(shuffle: bool, pairs: bool = True, materialize: bool = False):
            ds = ray.data.read_parquet(lake.path(FEATURES), filesystem=lake.arrow_fs).select_columns(
                ["embedding", "views"])
            if pairs:
                ds = ds.map_batches(training_pairs, batch_format="pyarrow")
            buffer = 4 * bs if shuffle else None
            cache = []

            def iterate():
                if materialize and not cache:
                    cache.append(ds.materialize())  # inside epoch 1's timing
                source = cache[0] if materialize else ds
                return source.iter_torch_batches(batch_size=bs, drop_last=True, local_shuffle_buffer_size=buffer)

            return iterate

        files = sorted(Path(lake_uri).glob("features/shard=*/*.parquet"))
        table_ = pa.concat_tables(pq.read_table(f, columns=["embedding", "views"]) for f in files)
        in_memory = torch.from_numpy(training_pairs(table_)["views"])

        def plain():
            order = torch.randperm(len(in_memory))
            for start in range(0, len(order) - bs + 1, bs):
                yield {"views": in_memory[order[start:start + bs]]}

        def parquet_each_epoch():
            for f in files:
                views = torch.from_numpy(training_pairs(pq.read_table(f, columns=["embedding", "views"]))["views"])
                for start in range(0, len(views) - bs + 1, bs):
                    yield {"views": views[start:start + bs]}

        variants = [
            ("in memory, shuffled indices (plain loop)", plain),
            ("pyarrow read + training_pairs per epoch, no Ray", parquet_each_epoch),
            ("Ray Data as in training.py (read, pairs, local shuffle 4x batch)", ray_dataset(True)),
            ("Ray Data, no local shuffle", ray_dataset(False)),
            ("Ray Data, materialized once after pairs, local shuffle", ray_dataset(True, materialize=True)),
        ]
        rows = []
        for name, iterate in variants:
            result = epochs(iterate, args.epochs)
            steady = result[1:] or result
            rows.append({
                "variant": name,
                "epoch 1 wall s": result[0][0],
                "later epochs wall s": statistics.mean(r[0] for r in steady),
                "later epochs consumer CPU s": statistics.mean(r[1] for r in steady),
                "rows/epoch": result[-1][2],
            })
            print(rows[-1], flush=True)
        ray.shutdown()
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
