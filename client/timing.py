"""How long the training loop waits for data: per-step timing, summarised for the server a few times a second."""

from __future__ import annotations

import bisect
import time

from ..protos import feed_pb2
from ..protos.constants import WAIT_BUCKETS_S

REPORT_INTERVAL_S = 0.5
"""Shortest time between two reports: at most two a second, whatever the step rate."""


class StepTimer:
    """Times the steps of one consumer thread: `waiting()` on entering __next__, `served()` when it hands out
    a batch. A step runs from one batch handed out to the next; its data wait is the time spent inside
    __next__ for that batch (across any epoch markers in between). The first batch only starts the clock."""

    __slots__ = ("_counts", "_last_report", "_served_at", "_step_s", "_steps", "_wait_s", "_waiting_since")

    def __init__(self) -> None:
        self._served_at: float | None = None
        self._waiting_since: float | None = None
        self._last_report = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self._steps, self._wait_s, self._step_s = 0, 0.0, 0.0
        self._counts = [0] * (len(WAIT_BUCKETS_S) + 1)

    def waiting(self) -> None:
        """The loop asked for the next item (a no-op while it is still waiting for the same batch)."""
        if self._waiting_since is None:
            self._waiting_since = time.perf_counter()

    def served(self) -> None:
        """A batch goes to the loop: one step ends."""
        now = time.perf_counter()
        since, previous = self._waiting_since, self._served_at
        self._waiting_since, self._served_at = None, now
        if previous is None or since is None:
            return
        wait = now - since
        self._steps += 1
        self._wait_s += wait
        self._step_s += now - previous
        self._counts[bisect.bisect_left(WAIT_BUCKETS_S, wait)] += 1

    def report(self) -> feed_pb2.StepTiming | None:
        """The steps since the last report, if any and at least REPORT_INTERVAL_S has passed; else None."""
        now = time.perf_counter()
        if not self._steps or now - self._last_report < REPORT_INTERVAL_S:
            return None
        summary = feed_pb2.StepTiming(steps=self._steps, wait_s=self._wait_s, step_s=self._step_s,
                                      wait_counts=self._counts)
        self._last_report = now
        self._reset()
        return summary
