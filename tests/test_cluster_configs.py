"""cluster-configs/: every YAML parses, runs images built from this repo or pinned to the installed Ray,
and every job command in it (and in its README) is one the job's own argument parser accepts."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "cluster-configs"
YAMLS = sorted(CONFIGS.glob("*.yaml"))
LAUNCHER = CONFIGS / "aws.yaml"
SERVICE_ACCOUNT = CONFIGS / "kuberay-serviceaccount.yaml"
README = CONFIGS / "README.md"
DOCKERFILE = CONFIGS / "Dockerfile"
RAY_VERSION = version("ray")
RAYCLUST_VERSION = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)
RAYCLUST_IMAGE = re.compile(rf"(.+/)?rayclust:{re.escape(RAYCLUST_VERSION)}")
RAY_IMAGE = re.compile(rf"rayproject/ray:{re.escape(RAY_VERSION)}(-py\d+)?(-gpu)?")
IMAGE_KEYS = {"image", "head_image", "worker_image"}

# The jobs each file exists to run: a file that lost its command, or runs another job, fails.
JOBS_RUN_BY = {
    "kuberay-train.yaml": {"train"},
    "kuberay-refresh-raycronjob.yaml": {"refresh"},
    "kuberay-refresh-cronjob.yaml": {"refresh"},
    "README.md": {"embed", "train", "infer", "refresh"},
}


def documents(path: Path) -> list:
    return list(yaml.safe_load_all(path.read_text()))


def values_for(node, keys: set[str]):
    """Every value stored under one of ``keys``, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys:
                yield value
            yield from values_for(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from values_for(item, keys)


def command_lines(node):
    """Every string that mentions python, and every list of strings joined as one argv."""
    if isinstance(node, dict):
        for value in node.values():
            yield from command_lines(value)
    elif isinstance(node, list):
        if node and all(isinstance(item, str) for item in node):
            yield shlex.join(node)
        for item in node:
            yield from command_lines(item)
    elif isinstance(node, str) and "python" in node:
        yield node


def readme_command_lines(text: str):
    blocks = re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, flags=re.M | re.S)
    for block in blocks:
        yield from (line for line in block.replace("\\\n", " ").splitlines() if "python" in line)


def entrypoints(command: str) -> list[tuple[str, list[str]]]:
    """(script, args) for each ``python SCRIPT.py ARGS`` in a shell command line."""
    tokens = shlex.split(command, comments=True)
    found = []
    for i, token in enumerate(tokens[:-1]):
        if re.fullmatch(r"(.*/)?python3?", token) and tokens[i + 1].endswith(".py"):
            args = []
            for arg in tokens[i + 2:]:
                if arg in {"&&", "||", ";", "|"}:
                    break
                args.append(arg)
            found.append((tokens[i + 1], args))
    return found


def entrypoints_in(path: Path) -> list[tuple[str, list[str]]]:
    if path.suffix == ".md":
        lines = readme_command_lines(path.read_text())
    else:
        lines = (line for doc in documents(path) for line in command_lines(doc))
    return [entry for line in lines for entry in entrypoints(line)]


def image_workdir() -> str:
    return re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.M).group(1)


def job_script(script: str) -> Path:
    """The checkout's file for a script path: relative to the checkout, or under the image's WORKDIR."""
    path = Path(script)
    if path.is_absolute() and path.is_relative_to(image_workdir()):
        path = path.relative_to(image_workdir())
    return REPO / path


@functools.cache
def job_parser(path: Path):
    spec = importlib.util.spec_from_file_location(f"rayclust_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return importlib.import_module(module.main.__module__).build_parser()  # the command jobs/X.py runs


def parser_error(path: Path, args: list[str]) -> str | None:
    """What the job's parser says about ``args``, or None when it accepts them."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            job_parser(path).parse_args(args)
        except SystemExit:
            return stderr.getvalue().strip() or "exited"
    return None


def entrypoint_problem(script: str, args: list[str]) -> str | None:
    path = job_script(script)
    if path.parent != REPO / "jobs":
        return f"not a script in jobs/ (nor in the image's {image_workdir()}/jobs/)"
    if not path.is_file():
        return f"{path.relative_to(REPO)} does not exist in this checkout"
    return parser_error(path, args)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_images_are_this_repo_or_the_installed_ray(path):
    docs = documents(path)
    assert docs and all(isinstance(doc, dict) for doc in docs), f"{path.name}: not YAML mappings"
    images = [image for doc in docs for image in values_for(doc, IMAGE_KEYS)]
    assert images or path == SERVICE_ACCOUNT, f"{path.name} names no image"
    for image in images:
        assert RAYCLUST_IMAGE.fullmatch(image) or RAY_IMAGE.fullmatch(image), (
            f"{path.name}: image {image} is neither rayclust:{RAYCLUST_VERSION} (cluster-configs/Dockerfile) "
            f"nor rayproject/ray:{RAY_VERSION}")
    for ray_version in (v for doc in docs for v in values_for(doc, {"rayVersion"})):
        assert ray_version == RAY_VERSION, f"{path.name}: rayVersion {ray_version}, installed Ray {RAY_VERSION}"


def test_dockerfile_builds_the_image_the_manifests_run():
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.M).group(1)
    assert RAY_IMAGE.fullmatch(base), f"Dockerfile FROM {base}, installed Ray {RAY_VERSION}"
    assert f"-t YOUR-REGISTRY/rayclust:{RAYCLUST_VERSION} ." in README.read_text()


def test_launcher_config_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(config))  # what `ray up` checks before touching AWS
    for name, node_type in config["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name} nodes would have no S3 access"


@pytest.mark.parametrize("name", sorted(JOBS_RUN_BY))
def test_each_file_runs_its_jobs(name):
    found = {Path(script).stem for script, _ in entrypoints_in(CONFIGS / name)}
    assert JOBS_RUN_BY[name] <= found, f"{name} runs {sorted(found)}, expected {sorted(JOBS_RUN_BY[name])}"


@pytest.mark.parametrize("path", [*YAMLS, README], ids=lambda p: p.name)
def test_job_parsers_accept_every_entrypoint(path):
    problems = [f"{script} {shlex.join(args)}\n  {problem}" for script, args in entrypoints_in(path)
                if (problem := entrypoint_problem(script, args))]
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("mistake, message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--clusters", "1"], "must be at least 2"),
])
def test_checker_rejects_a_wrong_flag(mistake, message):
    (script, args), = entrypoints_in(CONFIGS / "kuberay-train.yaml")
    assert entrypoint_problem(script, args) is None
    assert message in entrypoint_problem(script, args + mistake)
    assert "does not exist" in entrypoint_problem(script.replace("train", "trian"), args)


def test_entrypoint_extraction():
    assert entrypoints("cd x && python jobs/a.py --b 'c d' && python3 jobs/e.py # f") == [
        ("jobs/a.py", ["--b", "c d"]), ("jobs/e.py", [])]
    argv = {"command": ["ray", "job", "submit", "--", "python", "jobs/a.py", "--b=*.tar"]}
    assert [entry for line in command_lines(argv) for entry in entrypoints(line)] == [("jobs/a.py", ["--b=*.tar"])]
