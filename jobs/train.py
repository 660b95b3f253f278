"""Train a contrastive-clustering model on the lake's feature table with Ray Train.

    python jobs/train.py --lake s3://bucket/lake --model mfavb --clusters 10
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import JobArgumentParser, at_least, run_job
from rayclust.models import available_models


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True, help="lake root: a local folder or an s3:// prefix")
    parser.add_argument("--model", default="mfavb", choices=available_models(), help="model (default: %(default)s)")
    parser.add_argument("--clusters", type=at_least(2), default=10, help="number of clusters K (default: %(default)s)")
    parser.add_argument("--epochs", type=at_least(1), default=20, help="training epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=at_least(1), default=256,
                        help="samples per worker per step; the loss sees workers x this (default: %(default)s)")
    parser.add_argument("--workers", type=at_least(1), default=None,
                        help="Ray Train workers (default: one per GPU, else 1 using all CPUs but one)")
    parser.add_argument("--run", default=None,
                        help="run name under LAKE/models/; an unfinished run of that name resumes "
                             "(default: MODEL-TIMESTAMP)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.training import TrainSettings, train

    train(TrainSettings(args.lake, args.model, args.clusters, args.epochs, args.batch_size, args.workers,
                        args.run, args.seed))


if __name__ == "__main__":
    run_job(main)
