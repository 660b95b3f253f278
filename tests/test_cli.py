"""The jobs' command lines (rayclust.cli): user mistakes end a job with one line on stderr and a
non-zero exit, no traceback, no Ray; a UserError raised in a Ray task is found behind Ray's wrapper.

Each job script runs as a subprocess with ``RAY_ADDRESS`` set to something that is not an
address: a job that reached ``init_ray()`` before validating its arguments would fail at once
with ``ValueError: Invalid address format`` and a traceback, so every case below also proves
that validation happens before Ray starts.
The cases run two at a time: most of their time is importing torch and Ray.
"""
from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
from PIL import Image

from rayclust.cli import user_error
from rayclust.commands import JOBS as JOBS_BY_NAME
from rayclust.commands import main as rayclust_main
from rayclust.errors import UserError

from conftest import REPO, TINY_ENCODER, job_env

JOBS = REPO / "jobs"


def error_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (job arguments, a phrase that the one-line error must contain)."""
    empty = str(root / "empty-lake")  # made by the fixture: a lake without a model
    missing = str(root / "no-such-lake")
    lake = str(root / "lake")
    shard = str(root / "shard-000000.tar")  # only its existence matters; never read
    return {
        "embed-wrong-shard-path": (["embed.py", "--shards", str(root / "nope" / "x-000000.tar"), "--lake", lake,
                                    "--encoder", TINY_ENCODER], "shard not found"),
        "embed-no-shard-matches": (["embed.py", "--shards", str(root / "nope-*.tar"), "--lake", lake,
                                    "--encoder", TINY_ENCODER], "no shards match"),
        "embed-unknown-encoder": (["embed.py", "--shards", shard, "--lake", lake, "--encoder", "nope"],
                                  "unknown encoder"),
        "embed-views-not-a-number": (["embed.py", "--shards", shard, "--lake", lake, "--views", "abc"],
                                     "invalid int value"),
        "embed-views-negative": (["embed.py", "--shards", shard, "--lake", lake, "--views", "-1"], "at least 0"),
        "embed-unknown-flag": (["embed.py", "--shards", shard, "--lake", lake, "--nope"], "unrecognized arguments"),
        "embed-missing-flag": (["embed.py", "--lake", lake], "--shards"),
        "train-empty-lake": (["train.py", "--lake", empty], "no features"),
        "train-unknown-model": (["train.py", "--lake", empty, "--model", "nope"], "invalid choice"),
        "train-one-cluster": (["train.py", "--lake", empty, "--clusters", "1"], "--clusters"),
        "train-epochs-not-a-number": (["train.py", "--lake", empty, "--epochs", "x"], "invalid int value"),
        "train-abbreviated-flag": (["train.py", "--lake", empty, "--epoch", "5"], "unrecognized arguments: --epoch"),
        "train-negative-self-label": (["train.py", "--lake", empty, "--self-label-epochs", "-1"], "at least 0"),
        "infer-no-model": (["infer.py", "--lake", empty], "no trained model"),
        "infer-no-lake": (["infer.py", "--lake", missing], "no lake at"),
        "train-no-lake": (["train.py", "--lake", missing], "no lake at"),
        "infer-unknown-flag": (["infer.py", "--lake", empty, "--model", "mfavb"], "unrecognized arguments"),
        "refresh-no-model": (["refresh.py", "--shards", shard, "--lake", empty], "no trained model"),
        "refresh-no-lake": (["refresh.py", "--shards", shard, "--lake", missing], "no lake at"),
        "infer-no-vocabulary-file": (["infer.py", "--lake", empty, "--vocabulary", str(root / "nope.txt")],
                                     "vocabulary file not found"),
        "report-no-lake": (["report.py", "--lake", missing], "no lake at"),
        "report-no-model": (["report.py", "--lake", empty], "no trained model"),
        "folder2shards-no-images": (["folder2shards.py", "--images", empty, "--out", lake], "no images in"),
        "refresh-wrong-shard-path": (["refresh.py", "--shards", str(root / "nope" / "x-000000.tar"),
                                      "--lake", lake], "shard not found"),
        "refresh-drift-limit-above-one": (["refresh.py", "--shards", shard, "--lake", lake,
                                           "--max-cluster-shift", "2"], "between 0 and 1"),
        "refresh-lock-ttl-too-short": (["refresh.py", "--shards", shard, "--lake", lake, "--lock-ttl", "1"],
                                       "at least 10"),
    }


def run_job(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "validation-must-fail-before-ray-starts"}
    return subprocess.run([sys.executable, str(JOBS / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    (root / "shard-000000.tar").write_bytes(b"")
    (root / "empty-lake").mkdir()
    cases = error_cases(root)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_job, args, root) for name, (args, _) in cases.items()}
        return {"root": root, "cases": cases, "runs": {name: f.result() for name, f in futures.items()}}


@pytest.mark.parametrize("case", list(error_cases(Path("/x"))))
def test_mistake_is_one_line_and_nonzero_exit(results, case):
    run = results["runs"][case]
    _, phrase = results["cases"][case]
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{run.stderr}"
    assert run.returncode != 0
    assert phrase in lines[0], lines[0]
    assert lines[0].startswith(("error:", "embed.py: error:", "train.py: error:", "infer.py: error:",
                                "refresh.py: error:"))


def test_mistakes_leave_no_lake_behind(results):
    assert not (results["root"] / "lake").exists()
    assert not (results["root"] / "no-such-lake").exists()


def embed_until_ray_starts(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The embed job with valid flags (one empty shard), so it goes on to ``init_ray``."""
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(b"")
    return subprocess.run([sys.executable, str(JOBS / "embed.py"), "--shards", str(shard), "--lake",
                           str(tmp_path / "lake"), "--encoder", TINY_ENCODER],
                          env=env, capture_output=True, text=True, timeout=120)


def test_an_address_where_no_ray_listens_is_one_line(tmp_path):
    """``ray.init`` alone would wait for ever."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    run = embed_until_ray_starts(tmp_path, {**os.environ, "RAY_ADDRESS": address})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert f"no Ray cluster answers at RAY_ADDRESS={address}" in lines[0], lines[0]


def test_a_local_ray_that_cannot_start_is_one_line(tmp_path):
    """No RAY_ADDRESS, so the job starts a local Ray: here its temporary folder lies under a file, which
    fails at once; a raylet too slow to register on a busy machine fails in the same place, after 30 s."""
    (tmp_path / "a-file").write_text("")
    run = embed_until_ray_starts(tmp_path, {**job_env(), "RAY_TMPDIR": str(tmp_path / "a-file" / "ray")})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert lines[0].startswith("error: could not start a local Ray"), lines[0]
    assert "NotADirectoryError" in lines[0], lines[0]


def job_flags(name: str) -> set[str]:
    parser = importlib.import_module(JOBS_BY_NAME[name]).build_parser()
    return {flag for action in parser._actions for flag in action.option_strings}


def run_rayclust(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m rayclust ARGS``: the installed ``rayclust`` command's main (pyproject.toml), from this checkout."""
    return subprocess.run([sys.executable, "-m", "rayclust", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**job_env(), "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("job", list(JOBS_BY_NAME))
def test_help_exits_zero_and_lists_every_flag_both_ways(job, tmp_path):
    flags = job_flags(job)
    assert {"--help", "--verbose"} <= flags
    for run in (run_job([f"{job}.py", "--help"], tmp_path), run_rayclust([job, "--help"], tmp_path)):
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
        for flag in flags:
            assert flag in run.stdout, f"{job} --help does not mention {flag}"
    assert f"usage: rayclust {job} " in run.stdout


@pytest.mark.parametrize("job", list(JOBS_BY_NAME))
def test_help_states_every_default(job):
    parser = importlib.import_module(JOBS_BY_NAME[job]).build_parser()
    for action in parser._actions:
        if action.option_strings != ["-h", "--help"]:
            assert "default" in action.help or "(required)" in action.help, f"{job} {action.option_strings}"


def test_help_states_the_encoders_defaults():
    from rayclust.encoders import parse_spec

    encoder = next(a for a in importlib.import_module(JOBS_BY_NAME["embed"]).build_parser()._actions
                   if a.dest == "encoder")
    assert f"default {parse_spec('effnet-lite0').image_size}" in encoder.help
    assert "%(default)s" in encoder.help and encoder.default == "open_clip:ViT-B-32:openai"


def test_rayclust_lists_its_jobs(tmp_path):
    run = run_rayclust(["--help"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert set(JOBS_BY_NAME) <= set(re.findall(r"^  (\w+) ", run.stdout, flags=re.M)), run.stdout


@pytest.mark.parametrize("args, phrase", [
    (["nosuch"], "rayclust: error: unknown job 'nosuch'"),
    ([], "rayclust: error: no job given"),
    (["train", "--lake", "x", "--epoch", "5"], "rayclust train: error: unrecognized arguments: --epoch 5"),
])
def test_rayclust_mistake_is_one_line_and_exit_2(args, phrase, tmp_path):
    run = run_rayclust(args, tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and phrase in run.stderr, run.stderr


def test_pip_installs_the_rayclust_command():
    """The console script pip writes calls this function (pyproject.toml's [project.scripts])."""
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["rayclust"]
    module, function = entry.split(":")
    assert getattr(importlib.import_module(module), function) is rayclust_main


def test_rayclust_runs_a_job(tmp_path):
    """folder2shards through ``rayclust``: a real job without Ray, on three images in two labelled folders."""
    for index, label in enumerate(["cat", "cat", "dog"]):
        (tmp_path / "images" / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (index * 80, 0, 0)).save(tmp_path / "images" / label / f"{index}.png")
    run = run_rayclust(["folder2shards", "--images", "images", "--out", "shards", "--per-shard", "2"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "wrote 2 shards" in run.stdout, run.stdout
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]


def test_a_ray_task_s_user_error_is_found_behind_ray_s_wrapper(ray_session):
    @ray.remote
    def refuse() -> None:
        raise UserError("the task refused")

    with pytest.raises(Exception) as task:
        ray.get(refuse.remote())
    assert str(task.value) != "the task refused"  # Ray's wrapper: the remote traceback
    assert str(user_error(task.value)) == "the task refused"
    assert user_error(RuntimeError("a bug")) is None
