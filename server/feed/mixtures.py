"""A served dataset's mixture per epoch: its source weights and task weights, from the config's schedules, and the
plan of an epoch resumed under another mixture than it started with.

An epoch's plan is its mixtures, each with the position it applies from: configured, the epoch's mixture at row 0
and one more at each global row where a phase starts inside the epoch. Cached mode changes the mixture at those
rows exactly (cached/segments.py); streaming mode draws the epoch by shuffle block and takes each block's mixture
from the plan at the row the block starts in, so a phase from row R applies from the first shuffle block that
starts at or after R (streaming/block_mixtures.py). A cursor carries its epoch's plan (streaming: the mixtures of
the blocks it served, by block, and the plan by row). A resume under a configuration whose plan for the epoch
differs from the resumed position on keeps the carried plan before that position and takes the configured one
from it (cached: the resumed row; streaming: the next shuffle block not yet begun), so the epoch's rows before it
are the ones already served and the rest follows the new configuration; the packers make sure nothing served is
served again while unserved samples of its source remain (cached/segments.py, streaming/block_order.py). In cached
mode a mixture may name the membership (token store) whose sources its weights are over: a resume under another
source list inside the epoch (feed/source_change.py) lays the rest of the epoch out over the new list's store, and
the plan keeps each earlier mixture's store, so a later resume recomputes what every source served.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import DatasetSection
from ..errors import ConfigError, Refused
from ..pipeline.schedule import DEFAULT_WEIGHT, Weight, Weights, keys, next_change, rows_inside, weights_at
from ..pipeline.stage import Count
from ..streaming.block_mixtures import ALL_SERVED, BlockPlan, in_force

log = logging.getLogger(__name__)

CHANGES_KEPT = 8  # accepted mixture changes remembered for GetStats
MEMBERS_CHARS = 1024  # the longest `MixBody.m` a cursor carries (streaming: its sources' positions, `0,2,3`)


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
    m: str | None = Field(default=None, min_length=1, max_length=MEMBERS_CHARS)
    r: Literal[True] | None = None  # streaming mode: `at` is a global row of the plan by row (else a shuffle block)


@dataclass(frozen=True)
class Mixture:
    """The weights one epoch is served under: a weight per source (in `names` order) and the task weights, and the
    sources the weights are over when they are not the epoch's own list (cached mode: the membership, a token
    store, of another source list; streaming mode: their positions in the epoch's union of lists, `0,2,3`)."""

    weights: tuple[float, ...]
    tasks: tuple[tuple[str, float], ...] | None  # sorted by task; None: every task once
    members: str = ""  # "": the epoch's own sources; else a source list changed inside the epoch (see above)

    @property
    def task_weights(self) -> dict[str, float] | None:
        """The task weights as the curate stage takes them."""
        return None if self.tasks is None else dict(self.tasks)

    def body(self, at: int, *, by_row: bool = False) -> MixBody:
        """The mixture as a cursor carries it, applying from position `at` (`by_row`: a global row of a streaming
        epoch's plan by row, not a shuffle block)."""
        return MixBody(w=list(self.weights), t=self.task_weights, at=at, m=self.members or None, r=by_row or None)

    def describe(self, specs: list[str]) -> str:
        """The mixture for people: `a=1 b=0.5; tasks: explain=2` (weights over another source list: `#0=1 #1=0.5`)."""
        names = specs if len(specs) == len(self.weights) else [f"#{i}" for i in range(len(self.weights))]
        text = " ".join(f"{spec}={weight:g}" for spec, weight in zip(names, self.weights, strict=True))
        return text + ("" if self.tasks is None else "; tasks: " + " ".join(f"{k}={v:g}" for k, v in self.tasks))


Plan = tuple[tuple[int, Mixture], ...]
"""An epoch's mixtures, each with the position it applies from: the first from 0, the positions rising."""


plan_at = in_force
"""The mixture of a plan in force at a position."""


class Mixtures:
    """The configured mixture of every epoch, and the changes accepted on resume."""

    def __init__(self, section: DatasetSection, specs: list[str], file: str) -> None:
        unknown = sorted(keys(section.dataset_weights) - set(specs))
        if unknown:
            raise ConfigError(f"names no source of this dataset: {unknown}", key="dataset.dataset_weights",
                              file=file, fix=f"use the exact strings from dataset.names: {specs}")
        self.specs = specs
        self.dataset_weights: Weights | None = section.dataset_weights
        self.task_weights: Weights | None = section.task_weights
        self.changes: list[str] = []  # accepted on resume, the latest last
        self._effective: list[tuple[int, int, Mixture]] = []  # streaming: the latest phases logged as taking effect
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
        configured = self._configured(epoch, members)
        if not carried:
            return configured
        plan = self._carried(carried, members)
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

    def _configured(self, epoch: int, members: str) -> Plan:
        """The configured plan of `epoch`, its mixtures over the sources `members` names ("": the epoch's own)."""
        return tuple((start, replace(mixture, members=members)) for start, mixture in self.plan(epoch))

    def _carried(self, carried: list[MixBody], members: str = "") -> Plan:
        """A plan as a cursor carries it; FAILED_PRECONDITION when its positions do not rise from 0, or when its
        weights are over another number of sources than this dataset's while nothing says which (no mixture names
        its store, and `members` is "": the epoch's source list is this dataset's)."""
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
        return plan

    def block_body(self, blocks: Plan, rows: Plan) -> list[MixBody]:
        """A streaming epoch's plan as a cursor carries it: the mixtures of its served blocks by block, then its plan
        by row (left out when it is the last block's mixture throughout, as a cursor of one mixture has it)."""
        bodies = [mixture.body(start) for start, mixture in blocks]
        if not blocks or rows != ((0, blocks[-1][1]),):
            bodies += [mixture.body(start, by_row=True) for start, mixture in rows]
        return bodies

    def resumed_blocks(self, epoch: int, carried: list[MixBody] | None, at: int, row: int, *, unit: int,
                       pack: bool, members: str = "") -> BlockPlan[Mixture]:
        """The plan of a streaming cursor inside `epoch` resumed at global row `row`, whose first block none of which
        is served is `at` (ALL_SERVED: an epoch that wrapped): the blocks before `at` under the mixtures it carries,
        the blocks from `at` on by the configured plan by row (block_mixtures.py); a configured plan that differs
        from the carried one from `row` on is logged and kept for GetStats. FAILED_PRECONDITION as `resumed`.
        `members`: the positions of this dataset's sources in the epoch's source list when that list changed inside
        the epoch (feed/stream_sources.py; "": the same list), which the configured mixtures are tagged with."""
        configured = self._configured(epoch, members)
        if not carried:
            return BlockPlan((), 0, configured, unit, pack)
        blocks = self._carried([body for body in carried if not body.r], members)
        rows = self._carried([body for body in carried if body.r], members) if any(body.r for body in carried) else \
            ((0, blocks[-1][1]),)
        if at and not blocks:
            raise Refused("cursor: it carries no mixture of the shuffle blocks it served (corrupt)")
        at = max(at, blocks[-1][0] + 1) if blocks else at  # blocks listed from `at` on: the stream ended there
        if at >= ALL_SERVED:
            return BlockPlan(blocks, at, rows, unit, pack)
        served = tuple((start, mixture) for start, mixture in blocks if start < at)
        old, new = plan_at(rows, row), plan_at(configured, row)
        later = [(start, mixture) for start, mixture in configured if start > row]
        if (old, [x for x in rows if x[0] > row]) != (new, later):
            then = "; ".join(f"row {start}: {mixture.describe(self.specs)}" for start, mixture in later)
            self.accepted(f"epoch {epoch} from shuffle block {at}: {old.describe(self.specs)} -> "
                          f"{new.describe(self.specs)}" + (f", then from {then}" if then else "") +
                          f" (resumed at row {row}; the shuffle blocks before it were served under the checkpoint's "
                          "mixtures, and are not served again; a phase from a row applies from the first shuffle "
                          "block that starts at or after it)", "mixture changed on resume")
        return BlockPlan(served, at, configured, unit, pack)

    def took_effect(self, epoch: int, block: int, row: int, mixture: Mixture) -> None:
        """Log, once, that a streaming epoch's mixture changed at a shuffle block (a phase by row took effect)."""
        key = (epoch, block, mixture)
        with self._lock:
            if key in self._effective:
                return
            self._effective = [*self._effective, key][-CHANGES_KEPT:]
        log.info("mixture phase: epoch %d from shuffle block %d, which starts in row %d: %s", epoch, block, row,
                 mixture.describe(self.specs))

    def accepted(self, change: str, what: str) -> None:
        """Log a change accepted on resume and keep it for GetStats, once (the ranks of a job resume at once, each
        with the same change)."""
        with self._lock:
            if change in self.changes:
                return
            self.changes = [*self.changes, change][-CHANGES_KEPT:]
        log.info("%s: %s", what, change)
