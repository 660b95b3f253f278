"""Turn a folder of images into WebDataset shards (images in sub-folders get the sub-folder's name as a label).

The same as ``rayclust folder2shards`` (rayclust/commands/folder2shards.py), for a checkout and ``ray job submit``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working_dir

from rayclust.cli import run_job
from rayclust.commands.folder2shards import main

if __name__ == "__main__":
    run_job(main)
