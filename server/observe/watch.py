"""The input-bound warning: one log line when a job waits for data for too long, with the likely cause."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from ..config import InputBoundWarning
from .streams import OpenStream
from .timing import Window

Stream = OpenStream[Any]

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
"""A job is checked at most this often, however many of its ranks report."""

Job = tuple[str, int]
"""A job: the clients of one dataset with one world size."""


class InputBoundWatch:
    """Warns once per episode when a job is input-bound, as its clients' timing reports tell."""

    def __init__(self, settings: InputBoundWarning | None = None) -> None:
        self.settings = settings or InputBoundWarning()
        self._warned: set[Job] = set()
        self._checked: dict[Job, float] = {}

    def observe(self, stream: Stream, streams: Iterable[Stream], cached: bool) -> None:
        """After `stream` reported timing, check its job among the open `streams` (of a cached-mode dataset when
        `cached`)."""
        job = (stream.dataset, stream.client.world_size)
        now = time.monotonic()
        if now - self._checked.get(job, 0.0) < CHECK_INTERVAL_S:
            return
        self._checked[job] = now
        self._check(job, [s for s in streams if (s.dataset, s.client.world_size) == job], cached)

    def _check(self, job: Job, members: list[Stream], cached: bool) -> None:
        horizon, threshold = self.settings.window_s, self.settings.threshold
        windows = [(s, s.steps.window(horizon)) for s in members if s.steps.steps]
        step_s = sum(w.step_s for _, w in windows)
        fraction = sum(w.wait_s for _, w in windows) / step_s if step_s > 0 else 0.0
        if fraction <= threshold:
            if job in self._warned:
                self._warned.discard(job)
                log.info("dataset %s: the job of world size %d is no longer input-bound (%.0f%% waiting for data)",
                         job[0], job[1], 100 * fraction, extra={"dataset": job[0], "world_size": job[1]})
            return
        if job in self._warned or not any(s.steps.covers(horizon) for s, _ in windows):
            return
        self._warned.add(job)
        bound = sorted(((s, w) for s, w in windows if w.fraction > threshold), key=lambda sw: sw[0].client.rank)
        ranks = [s.client.rank for s, _ in bound]
        cause = likely_cause(cached, bound)
        log.warning("dataset %s: training is input-bound: rank(s) %s of world size %d waited for data %.0f%% of "
                    "their step time over the last %.0f s (threshold %.0f%%); likely cause: %s (see README, "
                    "Troubleshooting)", job[0], ",".join(map(str, ranks)), job[1], 100 * fraction, horizon,
                    100 * threshold, cause,
                    extra={"dataset": job[0], "world_size": job[1], "ranks": ranks, "fraction": round(fraction, 4),
                           "cause": cause})


def likely_cause(cached: bool, bound: list[tuple[Stream, Window]]) -> str:
    """What the server can see behind the waiting. A rank only waits for a batch it has granted, so if the server
    is too slow, the batches it owed the rank add up to at least about the rank's wait; if they add up to much
    less, the server had sent what was granted and the wait lies with the client (prefetch, network, decoding)."""
    owed = [s.client.rank for s, w in bound if 2 * w.owed_s >= w.wait_s]
    starved = [s.client.rank for s, w in bound if s.client.rank not in owed]
    causes = []
    if owed:
        ranks = ",".join(map(str, owed))
        causes.append(f"the server cannot cut batches as fast as rank(s) {ranks} consume them (a saturated sidecar CPU)"
                      if cached else
                      f"streaming tokenization slower than consumption (the server owed rank(s) {ranks} batches)")
    if starved:
        causes.append(f"rank(s) {','.join(map(str, starved))} had no credits outstanding: the server had sent every "
                      "batch they granted, so their prefetch is too small or they receive and decode too slowly")
    return "; ".join(causes)
