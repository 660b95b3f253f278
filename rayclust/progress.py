"""Progress a person reads: one line every few seconds with counts, rate and time left."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

EVERY_S = 10.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass
class Progress:
    """``stage: 12/100 shards, 1,200 samples, 95 samples/s, 1m30s left``, at most every ``every_s``."""

    stage: str
    total_shards: int
    every_s: float = EVERY_S
    shards: int = 0
    rows: int = 0
    started: float = field(default_factory=time.monotonic)
    printed: float = field(default_factory=time.monotonic)

    def update(self, shards: int = 0, rows: int = 0) -> None:
        self.shards += shards
        self.rows += rows
        now = time.monotonic()
        if now - self.printed >= self.every_s or self.shards == self.total_shards:
            self.printed = now
            print(self.line(now), file=sys.stdout, flush=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        left = (self.total_shards - self.shards) * elapsed / self.shards if self.shards else None
        eta = f", {duration(left)} left" if left is not None and self.shards < self.total_shards else ""
        return (f"{self.stage}: {self.shards}/{self.total_shards} shards, {self.rows:,} samples, "
                f"{self.rows / elapsed:,.0f} samples/s{eta}")
