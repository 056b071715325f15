"""A served dataset's mixture per epoch: its source weights and task weights, from the config's schedules, and the
plan of an epoch resumed under another mixture than it started with.

An epoch's plan is its mixtures, each with the position it applies from (a global row in cached mode, a shuffle
block in streaming mode): configured, the epoch's mixture at row 0 and one more at each row where a phase starts
inside the epoch (cached mode only, config.py). A cursor carries its epoch's plan. A resume under a configuration
whose plan for the epoch differs from the resumed position on keeps the carried plan before that position and
takes the configured one from it (cached: the resumed row; streaming: the next shuffle block not yet begun), so
the epoch's rows before it are the ones already served and the rest follows the new configuration; the packers
make sure nothing served is served again while unserved samples of its source remain (cached/segments.py,
streaming/block_order.py). In cached mode a mixture may name the membership (token store) whose sources its weights
are over: a resume under another source list inside the epoch (feed/source_change.py) lays the rest of the epoch
out over the new list's store, and the plan keeps each earlier mixture's store, so a later resume recomputes
what every source served.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ..config import DatasetSection
from ..errors import ConfigError, Refused
from ..pipeline.schedule import DEFAULT_WEIGHT, Weight, Weights, keys, next_change, rows_inside, weights_at
from ..pipeline.stage import Count

log = logging.getLogger(__name__)

CHANGES_KEPT = 8  # accepted mixture changes remembered for GetStats


class MixBody(BaseModel):
    """One mixture of an epoch's plan, as a cursor carries it: source weights in `names` order (by position, not
    path: data that moves keeps its cursors), task weights (None: one copy each), the position it applies from, and
    (cached mode, after a source was added or removed inside the epoch) the membership whose sources the weights
    are over (None: the epoch's own, the cursor's `members`); streaming mode, after a source was added or removed
    inside the epoch: the positions of its sources in the cursor's source list, `0,2,3` (stream_sources.py)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    w: list[Weight] = Field(min_length=1, max_length=4096)
    t: dict[str, Weight] | None = None
    at: Count = 0
    m: str | None = Field(default=None, min_length=1, max_length=1024)


@dataclass(frozen=True)
class Mixture:
    """The weights one epoch is served under: a weight per source (in `names` order) and the task weights, and in
    cached mode the membership (token store) whose sources the weights are over when it is not the epoch's own."""

    weights: tuple[float, ...]
    tasks: tuple[tuple[str, float], ...] | None  # sorted by task; None: every task once
    members: str = ""  # "": the epoch's membership; else a source list changed inside the epoch (cached mode)

    @property
    def task_weights(self) -> dict[str, float] | None:
        """The task weights as the curate stage takes them."""
        return None if self.tasks is None else dict(self.tasks)

    def body(self, at: int) -> MixBody:
        """The mixture as a cursor carries it, applying from position `at`."""
        return MixBody(w=list(self.weights), t=self.task_weights, at=at, m=self.members or None)

    def describe(self, specs: list[str]) -> str:
        """The mixture for people: `a=1 b=0.5; tasks: explain=2` (weights over another source list: `#0=1 #1=0.5`)."""
        names = specs if len(specs) == len(self.weights) else [f"#{i}" for i in range(len(self.weights))]
        text = " ".join(f"{spec}={weight:g}" for spec, weight in zip(names, self.weights, strict=True))
        return text + ("" if self.tasks is None else "; tasks: " + " ".join(f"{k}={v:g}" for k, v in self.tasks))


Plan = tuple[tuple[int, Mixture], ...]
"""An epoch's mixtures, each with the position it applies from: the first from 0, the positions rising."""


def plan_at(plan: Plan, position: int) -> Mixture:
    """The mixture in force at `position`."""
    return next(mixture for start, mixture in reversed(plan) if start <= position)


class Mixtures:
    """The configured mixture of every epoch, and the changes accepted on resume."""

    def __init__(self, section: DatasetSection, specs: list[str], file: str) -> None:
        unknown = sorted(keys(section.dataset_weights) - set(specs))
        if unknown:
            raise ConfigError(f"names no source of this dataset: {unknown}", key="dataset.dataset_weights",
                              file=file, fix=f"use the exact strings from dataset.names: {specs}")
        for key in ("dataset_weights", "task_weights"):
            setting = getattr(section, key)
            inside = [phase for phase in setting if phase.from_row] if isinstance(setting, list) else []
            if inside and not section.use_cache:
                raise ConfigError(
                    f"a phase from row {inside[0].from_row} of epoch {inside[0].from_epoch}: streaming mode cannot "
                    "change the mixture at a global row (a row's place is known only once the samples before it "
                    "are tokenized)", key=f"dataset.{key}", file=file,
                    fix="set dataset.use_cache: true (cached mode changes it at the exact row), or start the phase "
                        "at an epoch (from_row: 0)")
        self.specs = specs
        self.dataset_weights: Weights | None = section.dataset_weights
        self.task_weights: Weights | None = section.task_weights
        self.changes: list[str] = []  # accepted on resume, the latest last
        self._lock = threading.Lock()
        self.latest_epoch = 0  # the latest epoch a stream opened (GetStats shows its mixture)

    def opened(self, epoch: int) -> None:
        """A stream opened `epoch`."""
        self.latest_epoch = max(self.latest_epoch, epoch)

    def at(self, epoch: int, row: int = 0) -> Mixture:
        """The configured mixture at global row `row` of `epoch`."""
        weights = weights_at(self.dataset_weights, epoch, row) or {}
        tasks = weights_at(self.task_weights, epoch, row)
        return Mixture(tuple(weights.get(spec, DEFAULT_WEIGHT) for spec in self.specs),
                       None if tasks is None else tuple(sorted(tasks.items())))

    def next_change(self, epoch: int) -> int | None:
        """The first epoch after `epoch` whose configured mixture differs (None: none)."""
        changes = [e for e in (next_change(self.dataset_weights, epoch), next_change(self.task_weights, epoch))
                   if e is not None]
        return min(changes) if changes else None

    def rows_inside(self, epoch: int) -> list[int]:
        """The global rows after row 0 of `epoch` where a phase of either schedule starts (ascending)."""
        return sorted(set(rows_inside(self.dataset_weights, epoch)) | set(rows_inside(self.task_weights, epoch)))

    def plan(self, epoch: int) -> Plan:
        """The configured plan of `epoch`: its mixture at row 0, and each one a phase starts inside it, from its
        row."""
        plan: Plan = ((0, self.at(epoch)),)
        for row in self.rows_inside(epoch):
            mixture = self.at(epoch, row)
            if mixture != plan[-1][1]:
                plan += ((row, mixture),)
        return plan

    def body(self, plan: Plan) -> list[MixBody]:
        """The plan as a cursor carries it."""
        return [mixture.body(start) for start, mixture in plan]

    def resumed(self, epoch: int, carried: list[MixBody] | None, at: int, unit: str, members: str = "") -> Plan:
        """The plan of a cursor inside `epoch` resumed at position `at`: the one it carries before `at`, and the
        configured one from `at` on when it differs (logged and kept for GetStats); FAILED_PRECONDITION when it
        names a source this dataset lacks or its positions do not rise from 0. `members` (cached mode): the
        membership the configured mixtures are over when the epoch's source list is no longer this dataset's (a
        source added or removed inside the epoch; "": the same list), so each mixture names its sources' store."""
        configured = tuple((start, Mixture(m.weights, m.tasks, members)) for start, m in self.plan(epoch))
        if not carried:
            return configured
        plan: Plan = ()
        positional = not members and all(body.m is None for body in carried)
        for body in carried:
            if positional and len(body.w) != len(self.specs):
                raise Refused(f"cursor: made under a mixture of {len(body.w)} sources, but this dataset has "
                              f"{len(self.specs)}")
            if (body.at != 0) if not plan else body.at <= plan[-1][0]:
                raise Refused("cursor: its mixtures' positions do not rise from 0 (corrupt)")
            plan += ((body.at, Mixture(tuple(body.w), None if body.t is None else tuple(sorted(body.t.items())),
                                       body.m or "")),)
        served = tuple((start, mixture) for start, mixture in plan if start <= at)
        old, new = plan_at(plan, at), plan_at(configured, at)
        if new != old:
            served = (*served[:-1], (at, new)) if served[-1][0] == at else (*served, (at, new))
        resumed = served + tuple((start, mixture) for start, mixture in configured if start > at)
        if resumed == plan:
            return plan
        later = "; ".join(f"{unit} {start}: {mixture.describe(self.specs)}" for start, mixture in resumed
                          if start > at)
        change = (f"epoch {epoch} from {unit} {at}: {old.describe(self.specs)} -> {new.describe(self.specs)}"
                  + (f", then from {later}" if later else "") +
                  f" (the {unit}s before it were served under the checkpoint's mixtures, and are not served again)")
        self.accepted(change, "mixture changed on resume")
        return resumed

    def accepted(self, change: str, what: str) -> None:
        """Log a change accepted on resume and keep it for GetStats, once (the ranks of a job resume at once, each
        with the same change)."""
        with self._lock:
            if change in self.changes:
                return
            self.changes = [*self.changes, change][-CHANGES_KEPT:]
        log.info("%s: %s", what, change)
