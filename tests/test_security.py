"""Hostile input stays harmless: checkpoints and --init files load tensors only, a sample key or
a shard name cannot write outside its partition, and credentials never reach output, logs or the lake.
"""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, CreatesFile, start_job

CLUSTERS = 3
FEATURE_DIM = 8
PICKLE_FORMATS = ("torch-save", "plain-pickle")


# --- checkpoints and --init files: tensors only -------------------------------------------

def pickle_carrying(path: Path, kind: str, marker: Path) -> Path:
    """A .pt file whose loading with pickle would create ``marker``: torch.save's zip with a
    state dict beside the payload, or a plain pickle (torch's legacy format)."""
    if kind == "torch-save":
        torch.save({"model": {"weight": torch.zeros(2)}, "payload": CreatesFile(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"model": CreatesFile(marker)}))
    return path


def checkpoint_lake(root: Path, model_pt: bytes) -> dict:
    """A local lake whose LATEST names a checkpoint of a small CC-MLP, with ``model_pt`` as its model.pt."""
    from rayclust.models import model_config

    checkpoint = root / "models" / "run" / "checkpoint_000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps(
        {"model_config": model_config("ccmlp"), "feature_dim": FEATURE_DIM, "clusters": CLUSTERS}))
    (checkpoint / "model.pt").write_bytes(model_pt)
    latest = {"run": "run", "checkpoint": "models/run/checkpoint_000000", "model_version": "run/epoch-0",
              "clusters": CLUSTERS, "metrics": {}}
    (root / "models" / "LATEST").write_text(json.dumps(latest))
    return latest


def assert_one_line(message: str, *names: str) -> None:
    assert "\n" not in message.strip(), message
    for name in names:
        assert name in message, message


@pytest.mark.parametrize("kind", PICKLE_FORMATS)
def test_a_pickle_carrying_init_file_is_refused_unrun(tmp_path, kind):
    from rayclust.errors import UserError
    from rayclust.models import build_model, model_config, pretrained_state

    marker = tmp_path / "unpickled"
    path = pickle_carrying(tmp_path / "init.pt", kind, marker)
    with pytest.raises(UserError) as refused:
        pretrained_state(str(path), build_model(model_config("ccmlp"), FEATURE_DIM, CLUSTERS))
    assert_one_line(str(refused.value), f"--init {path}", "refused")
    assert not marker.exists()


@pytest.mark.parametrize("kind", PICKLE_FORMATS)
def test_a_pickle_carrying_checkpoint_is_refused_unrun(tmp_path, kind):
    import ray.train

    from rayclust.errors import UserError
    from rayclust.lake import Lake
    from rayclust.models.checkpoint import load_model
    from rayclust.training import load_training_state

    marker = tmp_path / "unpickled"
    model_pt = pickle_carrying(tmp_path / "model.pt", kind, marker).read_bytes()
    latest = checkpoint_lake(tmp_path / "lake", model_pt)
    checkpoint = tmp_path / "lake" / latest["checkpoint"]
    with pytest.raises(UserError) as for_inference:
        load_model(Lake.open(str(tmp_path / "lake")), latest)
    assert_one_line(str(for_inference.value), f"{checkpoint}/model.pt", "refused")
    with pytest.raises(UserError) as for_resuming:
        load_training_state(ray.train.Checkpoint.from_directory(str(checkpoint)))
    assert_one_line(str(for_resuming.value), f"{checkpoint}/model.pt", "refused")
    assert not marker.exists()


def test_the_marker_appears_when_the_pickle_is_run(tmp_path):
    """The checks above can fail: unpickling these files does create the marker."""
    marker = tmp_path / "unpickled"
    torch.load(pickle_carrying(tmp_path / "zip.pt", "torch-save", marker), weights_only=False)["payload"].close()
    assert marker.exists()


def run_script(args: list[str], log: Path) -> str:
    """A job script run to its end; its stdout and stderr together."""
    process = start_job([sys.executable, str(REPO / "jobs" / args[0]), *args[1:]], log)
    assert process.wait(timeout=300) != 0, log.read_text()
    return log.read_text()


def test_jobs_refuse_pickle_carrying_files_in_one_line(tmp_path, drawn_shards):
    marker = tmp_path / "unpickled"
    init = pickle_carrying(tmp_path / "init.pt", "plain-pickle", marker)
    lake = tmp_path / "lake"
    checkpoint_lake(lake, pickle_carrying(tmp_path / "model.pt", "torch-save", marker).read_bytes())
    trained = run_script(["train.py", "--lake", str(tmp_path / "other"), "--model", "pyramid", "--clusters", "2",
                          "--shards", str(drawn_shards / "drawn-000000.tar"), "--init", str(init)], tmp_path / "t.log")
    inferred = run_script(["infer.py", "--lake", str(lake)], tmp_path / "i.log")
    for output, name in ((trained, f"--init {init}"), (inferred, "checkpoint_000000/model.pt")):
        assert output.startswith("error: ") and "Traceback" not in output, output
        assert_one_line(output, name, "refused")
    assert not marker.exists()
    assert sorted(p.name for p in lake.iterdir()) == ["models"], "infer wrote to the lake"

