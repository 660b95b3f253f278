"""Embed and label only the new or changed shards of a source, with the LATEST model.

The same as ``rayclust refresh`` (rayclust/commands/refresh.py), for a checkout and ``ray job submit``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import run_job
from rayclust.commands.refresh import main

if __name__ == "__main__":
    run_job(main)
