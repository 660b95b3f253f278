"""Shared helpers of the benchmark scripts: machine description, tables, and a process-tree
memory monitor. Benchmarks are not tests: they print tables for BENCHMARKS.md."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR_SHARDS = SHARED_DATA / "cifar10-test-wds"
CIFAR_FEATURES = SHARED_DATA / "cifar10-test-effnetlite0.npz"
PYTHON = sys.executable
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ \(([a-z-]+)\): loss ([\d.]+) .*?, (\d+(?:\.\d+)?) samples/s")


@dataclass
class EpochLine:
    phase: str  # "contrastive" or "self-labelling"
    loss: float
    samples_per_second: float


def epoch_lines(output: str) -> list[EpochLine]:
    """The train job's per-epoch lines, in epoch order. Ray may print a worker's line twice
    (worker log + driver): one per epoch is kept."""
    by_epoch = {}
    for epoch, phase, loss, rate in EPOCH_LINE.findall(output):
        by_epoch.setdefault(int(epoch), EpochLine(phase, float(loss), float(rate)))
    return [by_epoch[e] for e in sorted(by_epoch)]


def cifar_pattern(count: int) -> str:
    """Brace pattern for the first ``count`` (1..10) CIFAR-10 test shards."""
    if not 1 <= count <= 10:
        raise SystemExit("there are 10 CIFAR shards: pick 1..10")
    return str(CIFAR_SHARDS / f"cifar10-test-{{000000..{count - 1:06d}}}.tar")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPUs ({model}), {memory:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}; load average now {load}")


def header(title: str) -> None:
    print(f"# {title}")
    print(f"date:    {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    print(f"machine: {machine()}")
    print(flush=True)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table (pastes straight into BENCHMARKS.md)."""
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


@dataclass
class TreeMemory:
    """Peak memory of a process and all its descendants, polled every ``interval`` seconds.

    ``peak_rss`` is the peak of the *sum* of RSS over the tree (what the issue asks for; it
    counts shared pages, e.g. the Ray object store in /dev/shm and shared libraries, once per
    process that maps them). ``peak_pss`` is the peak sum of PSS, which splits shared pages
    between the processes that map them, so it is closer to what the machine really spends.
    """

    pid: int
    interval: float = 0.2
    pss_every: int = 5  # PSS (smaps_rollup) costs more than RSS (statm): read it every 5th poll
    peak_rss: int = 0
    peak_root_rss: int = 0  # the root process alone (a job's driver)
    peak_pss: int = 0
    peak_processes: int = 0
    samples: int = 0
    timeline: list = field(default_factory=list)  # (seconds, rss sum, pss sum, processes)
    at_peak: list = field(default_factory=list)  # (process name, rss, pss) at the peak of the RSS sum
    cpu_by_pid: dict = field(default_factory=dict)  # last seen user+system CPU seconds of each process
    machine_busy_seconds: float = 0.0  # CPU seconds all processes of the machine spent meanwhile
    wall_seconds: float = 0.0
    _names: dict = field(default_factory=dict)
    names_seen: dict = field(default_factory=dict)  # pid -> every name it had (Ray actors rename themselves)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "TreeMemory":
        self._started = time.perf_counter()
        self._busy0 = _busy_seconds()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.machine_busy_seconds = _busy_seconds() - self._busy0
        self.wall_seconds = time.perf_counter() - self._started

    def processes_named(self, word: str) -> int:
        """How many distinct processes ever had ``word`` in their name (e.g. an actor class)."""
        return sum(any(word in name for name in names) for names in self.names_seen.values())

    @property
    def tree_cpu_seconds(self) -> float:
        return sum(self.cpu_by_pid.values())

    def cpu_by_name(self, top: int = 5) -> list[tuple[str, float]]:
        """CPU seconds per process name (Ray names its workers by what they run), largest first."""
        totals: dict[str, float] = {}
        for pid, seconds in self.cpu_by_pid.items():
            name = self._names.get(pid, "?")
            totals[name] = totals.get(name, 0.0) + seconds
        return sorted(totals.items(), key=lambda item: -item[1])[:top]

    @property
    def other_cores(self) -> float:
        """Mean cores used by processes outside the tree (other test runs): contamination."""
        return max(0.0, self.machine_busy_seconds - self.tree_cpu_seconds) / max(self.wall_seconds, 1e-9)

    def _run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                processes = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            with_pss = self.samples % self.pss_every == 0
            breakdown = []
            for process in processes:
                try:
                    info = process.memory_full_info() if with_pss else process.memory_info()
                    times = process.cpu_times()
                    self.cpu_by_pid[process.pid] = times.user + times.system
                    name = self._names.get(process.pid)
                    if name is None or name.startswith("ray::") or "worker" in name:
                        name = self._names[process.pid] = _name(process)  # Ray workers rename themselves
                        self.names_seen.setdefault(process.pid, set()).add(name)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss += info.rss
                if process.pid == self.pid:
                    self.peak_root_rss = max(self.peak_root_rss, info.rss)
                pss += getattr(info, "pss", 0)
                breakdown.append((name, info.rss, getattr(info, "pss", 0)))
            self.samples += 1
            if rss > self.peak_rss:
                self.peak_rss, self.at_peak = rss, sorted(breakdown, key=lambda b: -b[1])
            if with_pss:
                self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(processes))
            self.timeline.append((time.perf_counter() - self._started, rss, pss, len(processes)))
            self._stop.wait(self.interval)


@dataclass
class Finished:
    seconds: float
    returncode: int
    output: str
    memory: TreeMemory


def run_monitored(command: list[str], env: dict | None = None, interval: float = 0.2,
                  echo: bool = False) -> Finished:
    """Run ``command``, timing it end to end and polling its process tree's memory."""
    environment = {**os.environ, **(env or {})}
    environment.pop("RAY_ADDRESS", None)  # always a fresh local Ray, started (and owned) by the job
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment, cwd=REPO, start_new_session=True)
    monitor = TreeMemory(process.pid, interval).start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if echo:
            print("    | " + line, end="", flush=True)
    returncode = process.wait()
    seconds = time.perf_counter() - started
    monitor.stop()
    output = "".join(lines)
    if returncode != 0:
        print(output[-4000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(command)} failed with exit status {returncode}")
    return Finished(seconds, returncode, output, monitor)


def _name(process: psutil.Process) -> str:
    try:
        command = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not command:
        return process.name()
    if command[0].startswith("ray::"):
        return command[0][:60]
    words = [Path(w).name for w in command[:3]]
    return " ".join(words)[:60]


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # already inside user/nice
    return sum(times) - times.idle - getattr(times, "iowait", 0.0) - guest


def mib(n: int) -> float:
    return n / 2**20


S3_REQUEST_LINE = re.compile(r'^SeaweedFS_s3_request_total\{(?P<labels>[^}]*)\} (?P<value>[\d.e+]+)$', re.M)


def s3_request_counts(metrics_port: int) -> dict[str, int]:
    """SeaweedFS's S3 requests so far by type (GET, PUT, LIST, COPY, DELETE, HEAD ...), all
    buckets and status codes: the counter ``SeaweedFS_s3_request_total{bucket,code,type}``
    of its Prometheus endpoint. Diff two readings to count what a job sent."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, int] = {}
    for match in S3_REQUEST_LINE.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels")))
        kind = labels.get("type", "?")
        counts[kind] = counts.get(kind, 0) + int(float(match.group("value")))
    return counts


def count_difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in sorted(after) if after[k] != before.get(k, 0)}


def _write_shard_range(out: str, first: int, count: int, per_shard: int, classes: int, size: int,
                       prefix: str, seed: int) -> list[str]:
    sys.path.insert(0, str(REPO))
    from rayclust.synthetic import write_synthetic_shards

    return write_synthetic_shards(out, count, per_shard, classes, size, prefix, seed, first)


def write_shards_parallel(out: str, shards: int, per_shard: int, classes: int = 10, size: int = 32,
                          prefix: str = "part", seed: int = 0, first: int = 0,
                          workers: int | None = None) -> list[str]:
    """``rayclust.synthetic.write_synthetic_shards`` split over processes (drawing and JPEG
    encoding hold the GIL), in chunks of a few shards each; returns the URIs in order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or os.cpu_count() or 1
    chunk = max(1, min(20, shards // (4 * workers)))
    starts = range(first, first + shards, chunk)
    # spawn: the parent may hold s3fs's event-loop thread, which a fork would copy half-alive
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(_write_shard_range, *zip(*[
            (out, start, min(chunk, first + shards - start), per_shard, classes, size, prefix, seed)
            for start in starts]))
        return [uri for part in parts for uri in part]
