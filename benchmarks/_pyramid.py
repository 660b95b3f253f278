"""The pyramid models' clustering quality on images: ``jobs/train.py --model pyramid`` (or a
pretrained pyramid, ``--model pyramid-effnet-lite0``), then ``jobs/infer.py``.

Both jobs run as they would for a user (subprocesses, each with its own local Ray); ACC/NMI/ARI
are the infer job's, against the shards' ``.cls`` labels. ``benchmarks/quality.py`` calls
``pyramid_quality``; run this file alone for the figure in docs/models.md:

    python benchmarks/_pyramid.py --shards 10 --epochs 8
    python benchmarks/_pyramid.py --model pyramid-effnet-lite0 --shards 10 --seed 0
    python benchmarks/_pyramid.py --model pyramid-effnet-lite0 --digits --seed 0   # off CIFAR-10
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, cifar_pattern, epoch_lines, header, run_monitored, table  # noqa: E402

QUALITY_LINE = re.compile(r"rayclust labels\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)")


def pyramid_quality(shards_pattern: str, lake_dir: str, epochs: int | None, seed: int = 0,
                    batch_size: int | None = 128, clusters: int = 10, echo: bool = False,
                    model: str = "pyramid") -> dict:
    """Train a pyramid config on the shards' images (its own epochs and batch size where None),
    label them, and return
    acc, nmi, ari (infer job), seconds (train job wall time, Ray start-up included),
    infer_seconds, cpu_seconds (CPU time of the train job's process tree: the budget, which other
    load on a shared machine barely changes), other_cores (mean CPU use of other processes during
    training: contamination), and the per-epoch losses and samples/s the train job printed."""
    recipe = [*(["--epochs", str(epochs)] if epochs else []),
              *(["--batch-size", str(batch_size)] if batch_size else [])]
    trained = run_monitored(
        [PYTHON, "jobs/train.py", "--model", model, "--shards", shards_pattern, "--lake", lake_dir,
         "--clusters", str(clusters), *recipe, "--seed", str(seed), "--run", f"{model}-seed{seed}"],
        interval=1.0, echo=echo,
    )
    inferred = run_monitored([PYTHON, "jobs/infer.py", "--lake", lake_dir], interval=1.0, echo=echo)
    quality = QUALITY_LINE.findall(inferred.output)
    if not quality:
        raise SystemExit(f"no quality table in the infer job's output:\n{inferred.output[-3000:]}")
    epochs_printed = epoch_lines(trained.output)
    acc, nmi, ari = (float(v) for v in quality[-1])
    return {"acc": acc, "nmi": nmi, "ari": ari, "seconds": trained.seconds, "infer_seconds": inferred.seconds,
            "cpu_seconds": trained.memory.tree_cpu_seconds, "other_cores": trained.memory.other_cores,
            "losses": [e.loss for e in epochs_printed],
            "samples_per_second": [e.samples_per_second for e in epochs_printed]}


def digit_shards(workdir: Path) -> str:
    """The demo's digit images as WebDataset shards of 500 under ``workdir``; their pattern."""
    from rayclust.demo import DIGIT_SHARDS, write_digit_images, write_digit_shards

    write_digit_images(workdir / "images")
    write_digit_shards(workdir / "images", workdir / "shards")
    return str(workdir / "shards" / DIGIT_SHARDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10, help="first N CIFAR-10 test shards (default: %(default)s)")
    parser.add_argument("--model", default="pyramid", help="pyramid config (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lake", default=None, help="keep the lake here (default: a temporary folder)")
    parser.add_argument("--echo", action="store_true", help="echo the jobs' output")
    parser.add_argument("--digits", action="store_true",
                        help="the 1,797 scikit-learn digits drawn as the demo draws them (4 shards) "
                             "instead of CIFAR-10")
    args = parser.parse_args()
    header(f"Pyramid model (PCLC, config {args.model}) on {'digit' if args.digits else 'CIFAR-10 test'} images")
    with tempfile.TemporaryDirectory(prefix="rayclust-pyramid-") as workdir:
        shards = digit_shards(Path(workdir)) if args.digits else cifar_pattern(args.shards)
        result = pyramid_quality(shards, args.lake or f"{workdir}/lake", args.epochs, args.seed,
                                 args.batch_size, echo=args.echo, model=args.model)
    print(f"epochs {args.epochs or 'as configured'}, "
          f"batch size {args.batch_size or 'as configured'}, seed {args.seed}; "
          f"loss per epoch {' '.join(f'{v:.3f}' for v in result['losses'])}; "
          f"samples/s per epoch {' '.join(f'{v:.0f}' for v in result['samples_per_second'])}\n")
    scores = {k: f"{result[k]:.3f}" for k in ("acc", "nmi", "ari")}  # seeds differ in the third decimal
    print(table([scores | {k: result[k] for k in ("seconds", "cpu_seconds", "infer_seconds", "other_cores")}]))


if __name__ == "__main__":
    main()
