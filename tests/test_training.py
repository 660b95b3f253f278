"""Training (rayclust.training) on real features, scikit-learn's digits: Ray Train with several
workers, seeds, checkpoints, LATEST and resume; batch sizes fitted to small tables, tables without
views, and an image model given too few images for a batch."""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from sklearn.datasets import load_digits

from rayclust.errors import UserError
from rayclust.features import write_feature_arrays
from rayclust.labels import infer
from rayclust.lake import FEATURES, LABELS, MODELS, Lake
from rayclust.models import model_config
from rayclust.models.checkpoint import load_model
from rayclust.synthetic import write_synthetic_shards
from rayclust.training import TrainSettings, contrastive_epochs, evaluate_checkpoint, fit_batch_size, train

from conftest import (RAY_PROCESS, REPO, job_command, job_env, job_lines, kill, recorded_epochs, run_train_job,
                      wait_until, write_digits_feature_lake)

DIGITS = 1797
DIGITS_BATCH_MESSAGE = "batch size 256 -> 50 per worker: the feature table has 200 rows for 1 worker(s)"


@pytest.fixture(scope="module")
def real_feature_lake(tmp_path_factory, digits_features) -> Lake:
    return write_digits_feature_lake(digits_features, str(tmp_path_factory.mktemp("lake")), shards=2)


@pytest.mark.slow
def test_two_workers_on_two_cores_train_and_beat_chance(ray_session, real_feature_lake):
    """--workers 2 on a 2-CPU Ray must not hang waiting for CPUs that Ray Data also needs; DDP
    also runs the self-labelling epoch, which leaves the instance head without gradients. The fusing
    blocks at half the config's width: a quarter of its 7.5 M parameters, which DDP sums every step."""
    latest = train(TrainSettings(real_feature_lake.uri, "mfavb", clusters=10, epochs=3, batch_size=128,
                                 workers=2, run="two-workers", self_label_epochs=1, overrides={"width": 64}))
    assert latest["model_version"] == "two-workers/epoch-4"
    assert latest["metrics"]["phase"] == "self-labelling"
    assert real_feature_lake.read_json(MODELS, "LATEST")["run"] == "two-workers"
    assert np.isfinite(latest["metrics"]["loss"])
    heads = model_config("mfavb")["cluster_heads"]  # aligned after the contrastive epochs; LATEST says how well
    assert len(latest["metrics"]["head_agreement"]) == heads
    assert latest["metrics"]["head_agreement"][latest["metrics"]["reference_head"]] == 1.0
    alignment = load_model(real_feature_lake, latest).cluster_head.alignment
    assert all(sorted(row) == list(range(10)) for row in alignment.tolist())
    assert (alignment != torch.arange(10)).any(), "five heads from five random starts number their clusters alike"
    evaluation = evaluate_checkpoint(real_feature_lake, latest, real_feature_lake.newest_files(FEATURES))
    report = evaluation.quality
    assert report.samples == DIGITS == evaluation.health.rows
    assert report.rows[latest["model_version"]]["acc"] > 0.3, report  # chance is 0.1


@pytest.mark.slow
def test_one_worker_run_repeats_with_its_seed(ray_session, real_feature_lake):
    """The seeded shuffle repeats only if Ray Data hands the table's rows over in the same order."""
    runs = [train(TrainSettings(real_feature_lake.uri, "ccmlp", clusters=10, epochs=2, batch_size=128, workers=1,
                                run=f"repeat-{attempt}", seed=3, self_label_epochs=1, evaluate=False))
            for attempt in "ab"]
    first, second = (latest["metrics"] for latest in runs)
    assert first["loss"] == second["loss"] and first["kept"] == second["kept"], (first, second)


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(ray_session, tmp_path, digits_features):
    """The jobs run beside the module's own local Ray, as two users' jobs run on one machine."""
    lake = write_digits_feature_lake(digits_features, str(tmp_path / "lake"), shards=1)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = run_train_job(lake.uri, "resumable", 40, first_log)
    try:
        wait_until(lambda: recorded_epochs(lake, "resumable"), first, first_log, "a recorded checkpoint")
    finally:
        kill(first)
    assert lake.read_json(MODELS, "LATEST") is None, "LATEST must wait for a finished run"

    second = run_train_job(lake.uri, "resumable", 3, second_log)
    try:
        second.wait(timeout=400)
    finally:
        kill(second)
    output = second_log.read_text()
    assert second.returncode == 0, output
    assert "resumed run resumable after epoch" in output, output
    assert "epoch 1/4" not in output, output  # it did not start over
    assert "epoch 4/4 (self-labelling)" in output, output
    assert "Token authentication" not in output, output  # Ray's notice of its default, silenced
    assert "State API" not in output, output  # the placement-group cleaner, idle in a local Ray
    assert "multiple active Ray instances" not in output, output  # it looks in its own Ray, not the test's
    assert "PreemptionWatcher" not in output, output  # nothing drains a local Ray's node: no watcher, no error line
    latest = lake.read_json(MODELS, "LATEST")
    assert latest["model_version"] == "resumable/epoch-4"
    with lake.fs.open(lake.path(latest["checkpoint"], "config.json")) as f:
        assert json.load(f)["clusters"] == 10


# --- small tables, tables without views, too few images -----------------------------------------

def write_digits_lake(path, rows: int, views: int, files: int = 1) -> Lake:
    """The first ``rows`` digits (64 pixels scaled to [0, 1]) as a feature table of ``files`` files, with
    ``views`` noisy copies each."""
    digits = load_digits()
    clean = (digits.data[:rows] / 16).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.05, (rows, views, clean.shape[1])).astype(np.float32)
    keys = np.array([f"digit-{i}" for i in range(rows)])
    lake = Lake.open(str(path), create=True)
    for file, part in enumerate(np.array_split(np.arange(rows), files)):
        write_feature_arrays(lake, f"digits-{file}", keys[part], digits.target[part], clean[part],
                             clean[part, None] + noise[part], "digits")
    return lake


@pytest.mark.parametrize("batch, explicit, rows, workers, clusters, fitted", [
    (256, False, (200,), 1, 10, 50),  # four steps an epoch
    (256, False, (1000, 1000), 1, 10, 256),  # already four steps or more
    (256, False, (60,), 1, 10, 20),  # four steps would be a batch of 15: two samples per cluster win
    (256, False, (100, 100), 2, 10, 25),
    (256, False, (1000, 100, 100), 2, 10, 25),  # a worker may be dealt one small file: 100 rows
    (256, False, (250_000,) * 4, 1, 1000, 2000),  # two samples per cluster: a default batch grows
    (256, False, (250_000,) * 4, 4, 1000, 500),
    (64, True, (100,), 1, 10, 64),  # explicit: kept while one batch fits
])
def test_batch_fits_the_table(batch, explicit, rows, workers, clusters, fitted):
    assert fit_batch_size(batch, explicit, rows, workers, clusters) == fitted


@pytest.mark.parametrize("batch, explicit, rows, workers, clusters, phrase", [
    (256, False, (19,), 1, 10, "too few for 10 clusters"),
    (128, True, (100, 100), 2, 10, "no full batch of 128"),
    (128, True, (1000, 100, 100), 2, 10, "at least 100 rows"),  # the deal may give a worker one small file
    (256, False, (1000,), 2, 10, "1 file\\(s\\) for 2 workers"),  # each worker reads whole files
])
def test_a_batch_that_cannot_fit_is_refused(batch, explicit, rows, workers, clusters, phrase):
    with pytest.raises(UserError, match=phrase):
        fit_batch_size(batch, explicit, rows, workers, clusters)


@pytest.mark.parametrize("epochs, rows, batch, workers, trained", [
    (None, (1000,) * 10, 256, 1, 10),  # the benchmark's 10,000 rows: 39 steps an epoch, 390 in 10
    (None, (1000, 797), 256, 1, 56),  # the 1,797 digits: 7 steps an epoch
    (None, (1000, 797), 256, 2, 130),  # two workers: the deal may give one only the 797-row file, 3 steps
    (None, (500,), 125, 1, 98),  # 4 steps an epoch
    (3, (1000, 797), 256, 1, 3),  # epochs the user asked for are trained as asked
    (None, None, 64, 1, 10),  # an image model: its images are not counted
])
def test_a_small_table_trains_the_default_models_least_steps(epochs, rows, batch, workers, trained):
    settings = TrainSettings("lake", "ccmlp", epochs=epochs)
    assert contrastive_epochs(settings, model_config("ccmlp"), rows, batch, workers) == trained


@pytest.mark.parametrize("model, phase", [("ccmlp", "contrastive"), ("mfavb", "contrastive"), ("temi", "PMI"),
                                          ("temi-mfavb", "PMI")])
def test_a_feature_models_step_floor_is_its_own_recipes_steps_on_the_benchmark(model, phase, capsys):
    """The floor is what the shipped epochs make on the 10,000-row benchmark, not a value of its own: it
    must follow when the epochs or the batch change. The 1,797 digits make 7 steps an epoch."""
    config = model_config(model)
    assert config["min_steps"] == config["epochs"] * (10_000 // config["batch_size"])
    raised = contrastive_epochs(TrainSettings("lake", model), config, (1000, 797), config["batch_size"], 1)
    assert raised == -(-config["min_steps"] // 7) > config["epochs"]
    assert capsys.readouterr().out.startswith(f"{phase} epochs {config['epochs']} -> {raised}: 7 steps an epoch")


@pytest.mark.slow
def test_200_rows_without_views_train_with_the_default_batch_and_every_row_is_labelled(ray_session, tmp_path,
                                                                                       capsys):
    """Without views a model with neighbours takes its positives from the table's nearest rows."""
    lake = write_digits_lake(tmp_path / "lake", rows=200, views=0)
    latest = train(TrainSettings(lake.uri, "ccmlp", clusters=10, epochs=1, self_label_epochs=1, workers=1,
                                 run="small", evaluate=False))
    assert capsys.readouterr().out.count(DIGITS_BATCH_MESSAGE) == 1
    assert latest["model_version"] == "small/epoch-2" and latest["metrics"]["phase"] == "self-labelling"
    assert np.isfinite(latest["metrics"]["loss"])
    assert latest["metrics"]["warm_start_samples"] == 0  # 10 clusters: below the config's warm_start_clusters
    infer(lake.uri)
    labels = pads.dataset(lake.path(LABELS), filesystem=lake.arrow_fs, partitioning="hive").to_table()
    assert sorted(labels.column("key").to_pylist()) == sorted(f"digit-{i}" for i in range(200))
    # every cluster labels some digits: those the heads' consensus left empty on the table were refilled
    assert set(labels.column("cluster").to_pylist()) == set(range(10)), latest["metrics"]["refilled_clusters"]


@pytest.mark.slow
def test_cluster_heads_warm_start_from_k_means_of_the_table_on_rank_0_for_every_worker(ray_session, tmp_path):
    """Rank 0 fits the heads while rank 1 waits at DDP's wrap, which hands rank 0's weights on: heads
    left at random on rank 1 would assign its half of each epoch apart from rank 0's."""
    lake = write_digits_lake(tmp_path / "lake", rows=1000, views=2, files=2)
    latest = train(TrainSettings(lake.uri, "ccmlp", clusters=10, epochs=1, self_label_epochs=0, workers=2,
                                 run="warm", overrides={"warm_start_clusters": 10}))
    assert latest["metrics"]["warm_start_samples"] == 1000  # rank 0 reads the epoch as one worker would: 8 x 125
    assert min(latest["metrics"]["head_agreement"]) > 0.5, latest["metrics"]
    report = evaluate_checkpoint(lake, latest, lake.newest_files(FEATURES)).quality
    assert report.rows[latest["model_version"]]["acc"] > 0.6, report


def test_a_table_without_views_is_refused_for_a_model_without_neighbours(tmp_path):
    lake = write_digits_lake(tmp_path / "lake", rows=200, views=0)
    with pytest.raises(UserError, match="--views 0"):
        train(TrainSettings(lake.uri, "ccmlp", overrides={"neighbours": 0}))


@pytest.mark.slow
def test_too_few_images_for_a_batch_end_the_job_in_one_line_before_training(tmp_path):
    """An image model's samples are counted on the driver only as far as one batch per worker
    needs: 20 images for a batch of 128 stop the job before Ray Train starts, not after every
    restart of a worker that found no batch."""
    shards = write_synthetic_shards(str(tmp_path / "shards"), shards=1, per_shard=20)
    command = job_command("train.py", "--lake", str(tmp_path / "lake"), "--model", "pyramid", "--shards", shards[0],
                          "--epochs", "1", "--run", "too-few")
    # Ray's workers import rayclust from this checkout, not from wherever it is installed
    env = {**job_env(), "PYTHONPATH": str(REPO)}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 1, run.stderr
    assert job_lines(run.stderr) == ["error: no full batch of 128 samples per worker: the shards hold 20 images "
                                     "for 1 worker(s); lower --batch-size or --workers"], run.stderr
    assert "training pyramid run" not in run.stdout, run.stdout
    output = run.stdout + run.stderr
    # its traceback: the driver's, a worker's, the controller's
    assert "rayclust.errors.UserError" not in output, output
    # Ray's own processes may log tracebacks of their own trouble, unrelated to the job's: Ray Train's controller
    # when a resource request times out on a loaded machine, its PlacementGroupCleaner where several local Rays run
    assert not [line for line in output.splitlines() if "Traceback" in line and not RAY_PROCESS.search(line)], output


@pytest.mark.slow
def test_a_run_chooses_k_from_a_range_and_records_it(ray_session, tmp_path, digits_features, capsys):
    from rayclust.choose_k import CRITERION
    from rayclust.cli import ClusterRange

    lake = write_digits_feature_lake(digits_features, str(tmp_path / "lake"), shards=1)
    latest = train(TrainSettings(lake.uri, "ccmlp", clusters=ClusterRange(8, 12), epochs=1, self_label_epochs=0,
                                 batch_size=128, run="chosen", evaluate=False))
    out = capsys.readouterr().out
    assert [int(k) for k in re.findall(r"^K (\d+): silhouette ", out, re.M)] == [8, 9, 10, 11, 12], out
    chosen = int(re.search(r"^chose K = (\d+) by ", out, re.M).group(1))
    assert 8 <= chosen <= 12 and latest["clusters"] == chosen
    with lake.fs.open(lake.path(latest["checkpoint"], "config.json")) as f:
        config = json.load(f)
    assert config["clusters"] == chosen
    assert config["clusters_chosen"]["chosen"] == chosen and config["clusters_chosen"]["criterion"] == CRITERION
    assert [score["clusters"] for score in config["clusters_chosen"]["scores"]] == [8, 9, 10, 11, 12]
