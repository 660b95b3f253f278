"""Where the test suite's CPU goes: every process it starts, grouped by the name the kernel records.

The suite is CPU-bound on 2 cores (two test processes keep them ~90 % busy), so its time follows its
CPU-seconds. Linux process accounting records each process's CPU time when it exits, including the
Ray workers and actors that outlive no test but are no test's child: the names are Ray's process
titles cut to 15 characters (``ray::RayTrainWo`` is a Ray Train worker, ``ray::IDLE`` a worker
process whose last task ended or that never ran one). Needs root and Debian's ``acct`` package
(installed here if missing).

    python benchmarks/suite_cpu.py                       # runs `python -m pytest` under accounting
    python benchmarks/suite_cpu.py --accounting FILE     # only reads an accounting file
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, REPO, header, table  # noqa: E402

TICKS_PER_S = 100  # dump-acct's times are in clock ticks


def accounting_tools() -> None:
    """Debian's ``acct``, installed as the Makefile installs chromium: the package lists first (a fresh
    machine has none)."""
    if shutil.which("accton") is not None:
        return
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "acct"]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: `{' '.join(command)}` failed (process accounting needs Debian's acct, and root): "
                     f"{done.stderr.strip()[-300:]}")


def run_suite(accounting: Path, pytest_args: list[str]) -> tuple[float, int]:
    """The suite's wall seconds and exit status, with every exiting process recorded in ``accounting``."""
    accounting.touch()
    subprocess.run(["accton", str(accounting)], check=True, capture_output=True)
    started = time.monotonic()
    try:
        status = subprocess.run([PYTHON, "-m", "pytest", *pytest_args], cwd=REPO).returncode
    finally:
        subprocess.run(["accton", "off"], check=True, capture_output=True)
    return time.monotonic() - started, status


def cpu_by_name(accounting: Path) -> dict[str, tuple[int, float]]:
    """name -> (processes, CPU-seconds: user + system)."""
    dumped = subprocess.run(["dump-acct", str(accounting)], check=True, capture_output=True, text=True).stdout
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for line in dumped.splitlines():
        fields = [f.strip() for f in line.split("|")]
        by_name[fields[0]][0] += 1
        by_name[fields[0]][1] += (float(fields[2]) + float(fields[3])) / TICKS_PER_S
    return {name: (int(n), cpu) for name, (n, cpu) in by_name.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounting", type=Path, help="read this accounting file instead of running the suite")
    parser.add_argument("--top", type=int, default=20, help="rows of the table (default 20)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (default: the suite as `make test` runs it)")
    args = parser.parse_args()
    header("The test suite's CPU by process name (Linux process accounting)")
    accounting_tools()
    accounting, wall = args.accounting, None
    if accounting is None:
        accounting = Path(tempfile.mkdtemp()) / "pacct"
        wall, status = run_suite(accounting, args.pytest_args)
        print(f"\nsuite: exit status {status}, {wall:.0f} s wall")
    counts = cpu_by_name(accounting)
    total = sum(cpu for _, cpu in counts.values())
    if not total:
        sys.exit(f"no CPU time recorded in {accounting}")
    rows = [{"process name": name, "processes": n, "CPU s": round(cpu, 1), "share": f"{cpu / total:.1%}"}
            for name, (n, cpu) in sorted(counts.items(), key=lambda item: -item[1][1])[:args.top]]
    print(table(rows))
    busy = f", {total / wall:.2f} cores busy on average" if wall else ""
    print(f"\n{total:.0f} CPU-seconds in {sum(n for n, _ in counts.values())} processes{busy}")


if __name__ == "__main__":
    main()
