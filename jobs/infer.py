"""Label every feature row of the lake with the LATEST model: LAKE/labels/ (key -> cluster).

The same as ``rayclust infer`` (rayclust/commands/infer.py), for a checkout and ``ray job submit``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import run_job
from rayclust.commands.infer import main

if __name__ == "__main__":
    run_job(main)
