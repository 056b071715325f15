"""Batches and tokens served: totals, and rates over a sliding window of one minute."""

from __future__ import annotations

import time
from collections import deque


class Throughput:
    """Tokens served over a sliding window of one minute (added to on the event loop, read by any thread)."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.batches = 0
        self.tokens = 0

    def add(self, tokens: int) -> None:
        """Count one batch of `tokens` served now."""
        now = time.monotonic()
        self.batches += 1
        self.tokens += tokens
        self.events.append((now, tokens))
        while self.events and self.events[0][0] < now - self.WINDOW_S:
            self.events.popleft()

    def rate(self) -> float:
        """Tokens per second over the window."""
        events = list(self.events)  # one copy: a scrape thread reads while the event loop adds
        if len(events) < 2:
            return 0.0
        span = max(events[-1][0] - events[0][0], 1e-3)
        return (sum(t for _, t in events) - events[0][1]) / span

    def batch_rate(self) -> float:
        """Batches per second over the window."""
        events = list(self.events)
        if len(events) < 2:
            return 0.0
        return (len(events) - 1) / max(events[-1][0] - events[0][0], 1e-3)
