"""The ``rayclust`` command: ``rayclust JOB [flags]`` runs a job with the same flags as ``python jobs/JOB.py``.

Each job's module has ``build_parser()`` and ``main()``; ``main`` reads its flags from ``sys.argv``
as a script's does, so ``jobs/JOB.py`` (what ``ray job submit`` runs from a checkout) and this
command run the same function.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys

from rayclust.cli import run_job

JOBS = {  # subcommand -> the module with its build_parser() and main(), in the order --help lists them
    "folder2shards": "rayclust.commands.folder2shards",
    "embed": "rayclust.commands.embed",
    "train": "rayclust.commands.train",
    "infer": "rayclust.commands.infer",
    "refresh": "rayclust.commands.refresh",
    "report": "rayclust.commands.report",
    "demo": "rayclust.commands.demo",
}
PROG = "rayclust"


def summary_of(module: str) -> str:
    """The first line of a job module's docstring, read without importing the module (nor torch, nor Ray)."""
    source = importlib.util.find_spec(module).loader.get_source(module)
    return (ast.get_docstring(ast.parse(source)) or "").splitlines()[0]


def usage() -> str:
    width = max(map(len, JOBS))
    lines = [f"usage: {PROG} JOB [flags]   ({PROG} JOB --help: the job's flags)", "", "jobs:"]
    lines += [f"  {name:<{width}}  {summary_of(module)}" for name, module in JOBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``rayclust JOB [flags]``: the job's main, with ``sys.argv`` as ``python jobs/JOB.py [flags]`` would see it."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(usage())
        sys.exit(0)
    if not args or args[0] not in JOBS:
        what = f"unknown job {args[0]!r}" if args else "no job given"
        print(f"{PROG}: error: {what}: choose from {', '.join(JOBS)} (see {PROG} --help)", file=sys.stderr)
        sys.exit(2)
    name, *flags = args
    job = importlib.import_module(JOBS[name])
    sys.argv = [f"{PROG} {name}", *flags]  # argparse names the job "rayclust NAME" in its usage and errors
    run_job(job.main)
