"""K from the data (rayclust.choose_k): the chooser on scikit-learn's digits (10 classes) and on a
Gaussian mixture of known K, the --clusters values the train job takes, and one train job that
chooses K from a range and trains with it."""
from __future__ import annotations

import argparse
import re
import subprocess

import pytest
from sklearn.datasets import make_blobs

from rayclust.choose_k import choose_clusters
from rayclust.cli import AUTO_CLUSTERS, ClusterRange, cluster_count
from rayclust.errors import UserError

from conftest import job_command, job_env

PER_K_LINE = re.compile(r"^K (\d+): silhouette (-?[\d.]+) ± ([\d.]+) \(([\d.]+)s\)$", re.M)


def test_digits_choice_lands_near_ten(digits_features):
    """Digits drawn alike may merge, and the one-standard-error rule prefers the smaller K: the window is
    8 to 12 of the 6 to 14 tried (the auto range chooses 9, BENCHMARKS.md)."""
    lines = []
    choice = choose_clusters(digits_features["clean"], ClusterRange(6, 14), report=lines.append)
    assert 8 <= choice.chosen <= 12, choice
    assert [score.clusters for score in choice.scores] == list(range(6, 15))
    assert len(lines) == 9 and all(PER_K_LINE.match(line) for line in lines), lines
    best = max(choice.scores, key=lambda score: score.score)
    assert choice.best == best.clusters and choice.chosen <= choice.best


def test_mixture_choice_is_its_number_of_components():
    clean, _ = make_blobs(n_samples=1500, centers=8, n_features=64, cluster_std=2.0, center_box=(-2, 2),
                          random_state=0)
    choice = choose_clusters(clean, ClusterRange(4, 12), report=lambda line: None)
    assert choice.chosen == 8, choice


def test_too_few_rows_for_the_range_is_a_user_error(digits_features):
    with pytest.raises(UserError, match="too few to choose K"):
        choose_clusters(digits_features["clean"][:100], ClusterRange(20, 30))


@pytest.mark.parametrize("text, value", [("10", 10), ("2", 2), ("auto", AUTO_CLUSTERS), ("5:50", ClusterRange(5, 50)),
                                         ("2:3", ClusterRange(2, 3))])
def test_clusters_flag_takes_k_auto_and_ranges(text, value):
    assert cluster_count(text) == value


@pytest.mark.parametrize("text", ["1", "0", "x", "5:5", "9:3", "1:4", "3:", ":5", "-3:5", "a:b", "2:5:9", "Auto"])
def test_clusters_flag_refuses_other_values(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cluster_count(text)


def test_a_bad_clusters_value_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run(job_command("train.py", "--lake", str(tmp_path), "--clusters", "9:3"), env=job_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == ["train.py: error: argument --clusters: a range A:B needs 2 <= A < B, "
                                       "got '9:3' (see --help)"]


