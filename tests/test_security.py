"""Hostile input stays harmless: checkpoints and --init files load tensors only, a sample key or
a shard name cannot write outside its partition, and credentials never reach output, logs or the lake.
"""
from __future__ import annotations

import io
import json
import pickle
import re
import secrets
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from conftest import TINY_ENCODER, CreatesFile, job_command, start_job

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


def run_to_end(args: list[str], log: Path) -> tuple[int, str]:
    """A job script run to its end: its exit status, and its stdout and stderr together."""
    process = start_job(job_command(*args), log)
    return process.wait(timeout=600), log.read_text()


def test_jobs_refuse_pickle_carrying_files_in_one_line(tmp_path, drawn_shards):
    marker = tmp_path / "unpickled"
    init = pickle_carrying(tmp_path / "init.pt", "plain-pickle", marker)
    lake = tmp_path / "lake"
    checkpoint_lake(lake, pickle_carrying(tmp_path / "model.pt", "torch-save", marker).read_bytes())
    trained = run_to_end(["train.py", "--lake", str(tmp_path / "other"), "--model", "pyramid", "--clusters", "2",
                          "--shards", str(drawn_shards / "drawn-000000.tar"), "--init", str(init)], tmp_path / "t.log")
    inferred = run_to_end(["infer.py", "--lake", str(lake)], tmp_path / "i.log")
    for (status, output), name in ((trained, f"--init {init}"), (inferred, "checkpoint_000000/model.pt")):
        assert status != 0 and output.startswith("error: ") and "Traceback" not in output, output
        assert_one_line(output, name, "refused")
    assert not marker.exists()
    assert sorted(p.name for p in lake.iterdir()) == ["models"], "infer wrote to the lake"


# --- hostile keys and odd shard names stay in their partitions ------------------------------

HOSTILE = "hostile-000000"
ODD = "odd name=1-000000"  # spaces and "=" are fine in a partition's name
GOOD_KEYS = [f"good_{i}" for i in range(4)]
KEPT_KEYS = ["a/../../escape", "../../../../tmp/outside", "/etc/abs", "shard=evil/x", "n" * 100 + "\0nul"]
SKIPPED = {"..jpg": "member without a sample key", "link.jpg": "not a regular file",
           "hard.jpg": "not a regular file"}


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
               link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = len(data), kind, link
    tar.addfile(info, io.BytesIO(data))


def write_hostile_shard(path: Path) -> None:
    """Good samples, then samples whose keys hold "/", ".." and a NUL (a PAX name keeps it), a
    member with no key, and links pointing out of the tar (never followed)."""
    from rayclust.synthetic import draw_image, jpeg_bytes

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for label, key in enumerate(GOOD_KEYS + KEPT_KEYS):
            add_member(tar, f"{key}.jpg", jpeg_bytes(draw_image(label, rng)))
            add_member(tar, f"{key}.cls", str(label).encode())
        add_member(tar, "..jpg", jpeg_bytes(draw_image(0, rng)))
        add_member(tar, "link.jpg", kind=tarfile.SYMTYPE, link="../../../../etc/passwd")
        add_member(tar, "hard.jpg", kind=tarfile.LNKTYPE, link=f"{GOOD_KEYS[0]}.jpg")


@pytest.fixture(scope="module")
def hostile_lake(ray_session, tmp_path_factory) -> dict:
    from rayclust.features import embed
    from rayclust.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("hostile")
    (root / "shards").mkdir()
    write_hostile_shard(root / "shards" / f"{HOSTILE}.tar")
    write_synthetic_shards(str(root / "shards"), 1, 5, prefix=ODD.rsplit("-", 1)[0])
    before = {p: p.read_bytes() for p in (root / "shards").iterdir()}
    summary = embed(str(root / "shards" / "*.tar"), str(root / "lake"), TINY_ENCODER, views=1, batch_size=8)
    return {"root": root, "lake": root / "lake", "shards": before, "summary": summary}


def lake_table(lake: Path, table: str) -> list[dict]:
    return pads.dataset(lake / table, format="parquet", partitioning="hive").to_table(
        columns=["shard", "key", *(["reason"] if table == "errors" else [])]).to_pylist()


def test_every_file_lands_inside_its_shards_partition(hostile_lake):
    root, lake = hostile_lake["root"], hostile_lake["lake"]
    published = re.compile(rf"(features|errors)/shard=({HOSTILE}|{ODD})/"
                           rf"[0-9TZ]+-[0-9a-f]{{8}}_[0-9a-f]{{16}}\.parquet")
    files = {str(p.relative_to(lake)) for p in lake.rglob("*") if not p.is_dir()}
    assert all(published.fullmatch(f) or f == "_lock.guard" for f in files), sorted(files)
    folders = {str(p.relative_to(lake)) for p in lake.rglob("*") if p.is_dir()}
    assert folders <= {"features", "errors", "_staging", *(f"{t}/shard={s}" for t in ("features", "errors")
                                                             for s in (HOSTILE, ODD))}, sorted(folders)
    assert sorted(p.name for p in root.iterdir()) == ["lake", "shards"], "something was written beside the lake"
    assert {p: p.read_bytes() for p in (root / "shards").iterdir()} == hostile_lake["shards"]
    for key in KEPT_KEYS[:-1]:  # where a key taken for a path would have written
        for folder in (lake / "features" / f"shard={HOSTILE}", lake / "_staging", Path.cwd()):
            assert not any((folder / f"{key}{suffix}").exists() for suffix in ("", ".jpg", ".parquet")), key


def test_hostile_keys_are_plain_data_once_and_skipped_members_are_recorded(hostile_lake):
    features = lake_table(hostile_lake["lake"], "features")
    keys = [(row["shard"], row["key"]) for row in features]
    assert len(keys) == len(set(keys)), "a sample embedded twice"
    odd = {(ODD, f"odd name=1000000_{i:05d}") for i in range(5)}
    assert set(keys) == {(HOSTILE, key) for key in GOOD_KEYS + KEPT_KEYS} | odd
    errors = {row["key"]: row for row in lake_table(hostile_lake["lake"], "errors")}
    assert set(errors) == set(SKIPPED)
    for name, reason in SKIPPED.items():
        assert errors[name]["shard"] == HOSTILE and errors[name]["reason"].startswith(reason), errors[name]
    summary = hostile_lake["summary"]
    assert (summary.shards, summary.samples, summary.bad_samples) == (2, len(keys), len(SKIPPED))


@pytest.mark.parametrize("name", ["percent%41-000000.tar", "glob[1]-000000.tar", "tab\tname-000000.tar"])
def test_a_shard_name_that_would_not_read_back_is_refused_in_one_line(tmp_path, name):
    from rayclust.errors import UserError
    from rayclust.shards import expand_shards

    (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError) as refused:
        expand_shards(str(tmp_path / "*.tar"))
    assert_one_line(str(refused.value), "rename the file")


# --- credentials reach no output, log or lake file ------------------------------------------

def files_holding(secret: str, files: dict[str, bytes]) -> list[str]:
    return sorted(name for name, data in files.items() if secret.encode() in data)


def test_credentials_appear_in_no_error_of_a_job_that_fails_on_s3(s3_server, s3_env, tmp_path, monkeypatch):
    """Jobs that fail on S3 (a missing bucket; a wrong secret) name the problem in one line without
    the secrets. Jobs that succeed on S3, and the files of the Ray they ran on:
    tests/test_job_submit.py."""
    lake = f"s3://{s3_server.bucket}/secret-lake"
    outputs: dict[str, str] = {}
    status, outputs["missing-bucket"] = run_to_end(
        ["embed.py", "--shards", "s3://no-such-bucket-rayclust/raw/x.tar", "--lake", lake], tmp_path / "bucket.log")
    assert status != 0 and "no-such-bucket-rayclust" in outputs["missing-bucket"], outputs["missing-bucket"]
    wrong = secrets.token_hex(16)
    with monkeypatch.context() as patch:
        patch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        status, outputs["wrong-secret"] = run_to_end(["infer.py", "--lake", lake], tmp_path / "wrong.log")
    assert status != 0, outputs["wrong-secret"]
    for name, output in outputs.items():
        lines = [line for line in output.strip().splitlines() if not line.startswith("20")]  # Ray's start-up
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, (name, output)
    for secret in (s3_env["AWS_SECRET_ACCESS_KEY"], wrong):
        assert files_holding(secret, {f"output of {k}": v.encode() for k, v in outputs.items()}) == []
