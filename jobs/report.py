"""Write a static HTML report of the LATEST model's clusters: names, sizes, typical and boundary images, a map.

The same as ``rayclust report`` (rayclust/commands/report.py), for a checkout and ``ray job submit``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import run_job
from rayclust.commands.report import main

if __name__ == "__main__":
    run_job(main)
