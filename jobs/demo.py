"""Run the whole pipeline on real images on this machine: no cloud account, no download.

The same as ``rayclust demo`` (rayclust/commands/demo.py), for a checkout and ``ray job submit``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import run_job
from rayclust.commands.demo import main

if __name__ == "__main__":
    run_job(main)
