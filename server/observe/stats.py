"""What GetStats shows of connected clients: each stream's progress, tokens served per second, and the step
timing clients report (the input-bound views)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ...protos import feed_pb2
from ...protos.constants import WAIT_BUCKETS_S


@dataclass
class ClientStream:
    """One connected stream, as shown in stats."""

    peer: str
    client_id: str
    rank: int
    world_size: int
    epoch: int = 0
    batches: int = 0
    tokens: int = 0
    credits: int = 0
    opened: float = field(default_factory=time.monotonic)

    def to_proto(self) -> feed_pb2.ClientStats:
        """The GetStats view of this stream."""
        return feed_pb2.ClientStats(peer=self.peer, client_id=self.client_id, rank=self.rank,
                                    world_size=self.world_size, epoch=self.epoch, batches=self.batches,
                                    tokens=self.tokens, credits=self.credits,
                                    connected_s=time.monotonic() - self.opened)


class Throughput:
    """Tokens served over a sliding window of one minute."""

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
        if len(self.events) < 2:
            return 0.0
        span = max(self.events[-1][0] - self.events[0][0], 1e-3)
        return (sum(t for _, t in self.events) - self.events[0][1]) / span

    def batch_rate(self) -> float:
        """Batches per second over the window."""
        if len(self.events) < 2:
            return 0.0
        return (len(self.events) - 1) / max(self.events[-1][0] - self.events[0][0], 1e-3)


@dataclass
class StepStats:
    """The timing one client reports (client/timing.py): totals since the stream opened, and recent reports."""

    KEEP_S = 600.0  # reports older than this are forgotten (the longest warning window allowed)

    steps: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(WAIT_BUCKETS_S) + 1, dtype=np.int64))
    first: float | None = None  # when the first report arrived
    owed_s: float = 0.0  # the stream's Credits.owed_s at the last report
    recent: deque[tuple[float, int, float, float, float]] = field(default_factory=deque)  # t, steps, wait, step, owed

    def add(self, timing: feed_pb2.StepTiming, owed_s: float) -> None:
        """Count one report; `owed_s`: summed over the batches sent so far, how long the server owed each."""
        now = time.monotonic()
        self.first = now if self.first is None else self.first
        owed, self.owed_s = owed_s - self.owed_s, owed_s
        self.steps += timing.steps
        self.wait_s += timing.wait_s
        self.step_s += timing.step_s
        counts = np.asarray(timing.wait_counts, dtype=np.int64)[: len(self.counts)]
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


MINUTE_S = 60.0


def input_bound(members: list[tuple[int, str, StepStats]]) -> feed_pb2.InputBound:
    """The input-bound view of one client or a group of them, given as (rank, client_id, stats): fractions of
    their summed wait and step times, the mean steps/s, and the rank with the highest fraction last minute."""
    out = feed_pb2.InputBound()
    reporting = [(rank, client, stats, stats.window(MINUTE_S)) for rank, client, stats in members if stats.steps]
    if not reporting:
        return out
    minute = Window()
    counts = np.zeros(len(WAIT_BUCKETS_S) + 1, dtype=np.int64)
    for _, _, stats, window in reporting:
        minute.wait_s, minute.step_s = minute.wait_s + window.wait_s, minute.step_s + window.step_s
        out.steps += stats.steps
        out.wait_s += stats.wait_s
        out.step_s += stats.step_s
        counts += stats.counts
    slowest = max(reporting, key=lambda member: member[3].fraction)
    out.reported = True
    out.fraction_1m = minute.fraction
    out.fraction_total = out.wait_s / out.step_s if out.step_s > 0 else 0.0
    out.steps_per_s = sum(window.steps_per_s for *_, window in reporting) / len(reporting)
    out.slowest_rank, out.slowest_client = slowest[0], slowest[1]
    bounds = [*WAIT_BUCKETS_S, float("inf")]
    out.wait_histogram.extend(feed_pb2.WaitBucket(upper_s=b, count=int(c)) for b, c in zip(bounds, counts, strict=True))
    return out


def job_views(members: list[tuple[int, int, str, StepStats]]) -> tuple[feed_pb2.InputBound, list[feed_pb2.JobStats]]:
    """A dataset's clients, given as (rank, world_size, client_id, stats): input-bound over all of them, and
    per job (the clients with one world size)."""
    jobs: dict[int, list[tuple[int, str, StepStats]]] = {}
    for rank, world_size, client, stats in members:
        jobs.setdefault(world_size, []).append((rank, client, stats))
    views = [feed_pb2.JobStats(world_size=w, ranks=sorted(r for r, _, _ in ranks), input_bound=input_bound(ranks))
             for w, ranks in sorted(jobs.items())]
    return input_bound([(rank, client, stats) for rank, _, client, stats in members]), views
