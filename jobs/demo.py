"""Run the whole pipeline on real images on this machine: no cloud account, no download.

    python jobs/demo.py --workdir demo-lake
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import JobArgumentParser, at_least, run_job


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo-lake", help="folder for images, shards and lake (default: %(default)s)")
    parser.add_argument("--epochs", type=at_least(1), default=30, help="training epochs (default: %(default)s)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.demo import run_demo

    run_demo(Path(args.workdir).resolve(), args.epochs)


if __name__ == "__main__":
    run_job(main)
