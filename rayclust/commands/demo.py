"""Run the whole pipeline on real images on this machine: no cloud account, no download.

    python jobs/demo.py --workdir demo-lake
"""
from pathlib import Path

from rayclust.cli import JobArgumentParser, at_least


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-lake",
                        help="folder for images, shards and lake (default: %(default)s)")
    parser.add_argument("--epochs", type=at_least(1), default=None,
                        help="contrastive epochs (default: the model's, raised on a small table to its minimum steps)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.demo import run_demo

    run_demo(Path(args.workdir).resolve(), args.epochs)

