"""Is a group of clients input-bound: their summed data wait over their summed step time, per client, per job
(the clients of one dataset with one world size) and per dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .timing import StepStats, Window, padded

MINUTE_S = 60.0

Member = tuple[int, str, StepStats]
"""A client in a group: (rank, client_id, its reported timing)."""


@dataclass
class InputBoundView:
    """The input-bound view of one client or a group of them."""

    reported: bool = False  # False: no member has reported timing yet
    fraction_1m: float = 0.0  # data wait / step time over the last minute
    fraction_total: float = 0.0  # since the streams opened
    steps_per_s: float = 0.0  # over the last minute; a group's is the mean of its members
    steps: int = 0
    wait_s: float = 0.0
    step_s: float = 0.0
    wait_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # steps per wait bucket
    slowest_rank: int = 0  # the member with the highest fraction over the last minute
    slowest_client: str = ""


@dataclass
class JobView:
    """The clients of one dataset with one world size: the ranks of one job."""

    world_size: int
    ranks: list[int]
    input_bound: InputBoundView


def input_bound(members: list[Member]) -> InputBoundView:
    """Fractions of the members' summed wait and step times, their mean steps/s, and the rank with the highest
    fraction last minute."""
    out = InputBoundView()
    reporting = [(rank, client, stats, stats.window(MINUTE_S)) for rank, client, stats in members if stats.steps]
    if not reporting:
        return out
    minute = Window()
    each = [stats.counts for _, _, stats, _ in reporting]  # read once: a report may grow them meanwhile
    counts = np.zeros(max(map(len, each)), dtype=np.int64)
    for (_, _, stats, window), member_counts in zip(reporting, each, strict=True):
        minute.wait_s, minute.step_s = minute.wait_s + window.wait_s, minute.step_s + window.step_s
        out.steps += stats.steps
        out.wait_s += stats.wait_s
        out.step_s += stats.step_s
        counts += padded(member_counts, len(counts))
    slowest = max(reporting, key=lambda member: member[3].fraction)
    out.reported = True
    out.fraction_1m = minute.fraction
    out.fraction_total = out.wait_s / out.step_s if out.step_s > 0 else 0.0
    out.steps_per_s = sum(window.steps_per_s for *_, window in reporting) / len(reporting)
    out.slowest_rank, out.slowest_client = slowest[0], slowest[1]
    out.wait_counts = counts
    return out


def job_views(members: list[tuple[int, int, str, StepStats]]) -> tuple[InputBoundView, list[JobView]]:
    """A dataset's clients, given as (rank, world_size, client_id, stats): input-bound over all of them, and
    per job, by world size."""
    jobs: dict[int, list[Member]] = {}
    for rank, world_size, client, stats in members:
        jobs.setdefault(world_size, []).append((rank, client, stats))
    views = [JobView(w, sorted(r for r, _, _ in ranks), input_bound(ranks)) for w, ranks in sorted(jobs.items())]
    return input_bound([(rank, client, stats) for rank, _, client, stats in members]), views
