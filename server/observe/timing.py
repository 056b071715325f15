"""The step timing a client reports (client/timing.py): totals since its stream opened, and sums over a window."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class TimingReport(Protocol):
    """One report: steps since the last one, their data wait and step time, and waits counted per bucket."""

    @property
    def steps(self) -> int: ...

    @property
    def wait_s(self) -> float: ...

    @property
    def step_s(self) -> float: ...

    @property
    def wait_counts(self) -> Sequence[int]: ...


@dataclass
class Window:
    """Reports summed over a time window."""

    steps: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0
    owed_s: float = 0.0  # summed over the batches sent meanwhile: how long the server owed each

    @property
    def fraction(self) -> float:
        """Data wait / step time (0 when nothing was reported)."""
        return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    @property
    def steps_per_s(self) -> float:
        """Steps per second of the training loop, from its own clock."""
        return self.steps / self.step_s if self.step_s > 0 else 0.0


@dataclass
class StepStats:
    """The timing one client reports: totals since the stream opened, and recent reports."""

    KEEP_S = 600.0  # reports older than this are forgotten (the longest warning window allowed)

    steps: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # waits per bucket, as reported
    first: float | None = None  # when the first report arrived
    owed_s: float = 0.0  # the stream's Credits.owed_s at the last report
    recent: deque[tuple[float, int, float, float, float]] = field(default_factory=deque)  # t, steps, wait, step, owed

    def add(self, timing: TimingReport, owed_s: float) -> None:
        """Count one report; `owed_s`: summed over the batches sent so far, how long the server owed each."""
        now = time.monotonic()
        self.first = now if self.first is None else self.first
        owed, self.owed_s = owed_s - self.owed_s, owed_s
        self.steps += timing.steps
        self.wait_s += timing.wait_s
        self.step_s += timing.step_s
        counts = np.asarray(timing.wait_counts, dtype=np.int64)
        self.counts = padded(self.counts, len(counts))
        self.counts[: len(counts)] += counts
        self.recent.append((now, timing.steps, timing.wait_s, timing.step_s, owed))
        while self.recent and self.recent[0][0] < now - self.KEEP_S:
            self.recent.popleft()

    def window(self, horizon_s: float) -> Window:
        """What was reported over the last `horizon_s` seconds."""
        since = time.monotonic() - horizon_s
        out = Window()
        for t, steps, wait, step, owed in list(self.recent):
            if t >= since:
                out.steps, out.wait_s, out.step_s = out.steps + steps, out.wait_s + wait, out.step_s + step
                out.owed_s += owed
        return out

    def covers(self, horizon_s: float) -> bool:
        """Whether reports have been arriving for at least `horizon_s` seconds."""
        return self.first is not None and time.monotonic() - self.first >= horizon_s


def padded(counts: np.ndarray, length: int) -> np.ndarray:
    """`counts` with zeros appended up to `length` (itself when it is as long already)."""
    return counts if len(counts) >= length else np.pad(counts, (0, length - len(counts)))
