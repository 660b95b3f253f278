"""Train a contrastive-clustering model with Ray Train: on the lake's features, or on images (pyramid).

The same as ``rayclust train`` (rayclust/commands/train.py), for a checkout and ``ray job submit``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import run_job
from rayclust.commands.train import main

if __name__ == "__main__":
    run_job(main)
