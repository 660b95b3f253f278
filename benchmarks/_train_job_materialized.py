"""jobs/train.py with the proposed fix applied from outside (benchmarks only, library untouched):
the training dataset is materialized once (after ``training_pairs``) instead of re-read from
Parquet every epoch. Used by ``train_throughput.py --variant materialized``."""
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rayclust.training as training  # noqa: E402


class MaterializingTrainer(training.TorchTrainer):
    def __init__(self, *args, datasets=None, **kwargs):
        datasets = {name: ds.materialize() for name, ds in (datasets or {}).items()}
        super().__init__(*args, datasets=datasets, **kwargs)


training.TorchTrainer = MaterializingTrainer
sys.argv[0] = str(REPO / "jobs" / "train.py")
runpy.run_path(str(REPO / "jobs" / "train.py"), run_name="__main__")
