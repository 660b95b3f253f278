"""Embed WebDataset shards into the lake's feature table (clean + augmented-view features).

The same as ``rayclust embed`` (rayclust/commands/embed.py), for a checkout and ``ray job submit``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import run_job
from rayclust.commands.embed import main

if __name__ == "__main__":
    run_job(main)
