"""Mixture schedules: `dataset_weights` and `task_weights` as a constant mapping or as phases over the run.

A phase starts at global row `from_row` (default 0) of epoch `from_epoch` and holds its weights until the next
phase starts; with `ramp_epochs: n` (a phase that starts at an epoch's row 0) it goes there in n equal linear
steps from the previous phase's weights (epoch from_epoch gets 1/n of the way, epoch from_epoch + n - 1 the
phase's weights). A key a mapping leaves out weighs 1.0 (a source's default weight, and a task's single copy), so
a ramp may bring a key in or out. A global row is a position every rank, layout, world size and resume shares (a
step is `world_size * batch_size` of them), so a phase that starts inside an epoch changes the mixture at the same
row for all of them (cached mode: at that row, cached/segments.py; streaming mode: from the first shuffle block
that starts at or after it, streaming/block_mixtures.py).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

DEFAULT_WEIGHT = 1.0
MAX_WEIGHT = 100.0  # a task weight copies each sample up to this often; source weights are relative, so any ratio fits
Weight = Annotated[float, Field(gt=0, le=MAX_WEIGHT, allow_inf_nan=False)]
"""One source or task weight, as the config and a cursor's mixtures give it: finite, above 0, at most MAX_WEIGHT."""


class Phase(BaseModel):
    """One phase of a mixture schedule."""

    model_config = ConfigDict(extra="forbid")

    from_epoch: int = Field(ge=0)
    from_row: int = Field(default=0, ge=0, lt=1 << 53)
    weights: dict[str, Weight]
    ramp_epochs: int = Field(default=0, ge=0)


Weights = dict[str, Weight] | list[Phase]
"""A weights setting: a constant mapping, or a schedule (phases ordered by from_epoch, the first from epoch 0)."""


_PHASES = TypeAdapter(list[Phase])


def as_phases(value: Any) -> Any:
    """A list given for a weights setting as phases, its first error as a ValueError naming where (a mapping or
    anything else passes through unchanged)."""
    if not isinstance(value, list):
        return value
    try:
        return _PHASES.validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = "phase " + ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{where}: {first['msg']} (a phase is {{from_epoch, from_row, weights, "
                         "ramp_epochs})") from None


def check_phases(phases: list[Phase]) -> list[Phase]:
    """The phases, if they start at epoch 0 row 0, rise strictly, ramp only from an epoch's start and into a later
    phase; ValueError otherwise."""
    if not phases:
        raise ValueError("a schedule needs at least one phase (or give a plain mapping)")
    if (phases[0].from_epoch, phases[0].from_row) != (0, 0):
        raise ValueError(f"the first phase must have from_epoch: 0 (and from_row: 0), not {_at(phases[0])}")
    if phases[0].ramp_epochs:
        raise ValueError("the first phase has nothing to ramp from: remove its ramp_epochs")
    for phase in phases:
        if phase.ramp_epochs and phase.from_row:
            raise ValueError(f"the phase from {_at(phase)} ramps by whole epochs: give it from_row: 0, or no "
                             "ramp_epochs (a step change at that row)")
    for before, after in pairwise(phases):
        if (after.from_epoch, after.from_row) <= (before.from_epoch, before.from_row):
            raise ValueError(f"phases must rise strictly by (from_epoch, from_row) ({_at(before)} then {_at(after)})")
        if before.from_epoch + before.ramp_epochs > after.from_epoch:
            raise ValueError(f"the ramp of the phase from epoch {before.from_epoch} runs past epoch "
                             f"{after.from_epoch}, where the next phase starts")
    return phases


def _at(phase: Phase) -> str:
    """Where a phase starts, for people: `epoch 2` or `epoch 2 row 4096`."""
    return f"epoch {phase.from_epoch}" + (f" row {phase.from_row}" if phase.from_row else "")


def rows_inside(setting: Weights | None, epoch: int) -> list[int]:
    """The rows after row 0 of `epoch` where a phase starts (ascending)."""
    if setting is None or isinstance(setting, dict):
        return []
    return [phase.from_row for phase in setting if phase.from_epoch == epoch and phase.from_row]


def keys(setting: Weights | None) -> set[str]:
    """Every key the setting names, in any phase."""
    if setting is None:
        return set()
    if isinstance(setting, dict):
        return set(setting)
    return {key for phase in setting for key in phase.weights}


def weights_at(setting: Weights | None, epoch: int, row: int = 0) -> dict[str, float] | None:
    """The weights in force at global row `row` of `epoch` (None: no setting, every weight 1.0)."""
    if setting is None or isinstance(setting, dict):
        return None if setting is None else dict(setting)
    index = phase_index(setting, epoch, row)
    phase = setting[index]
    done = epoch - phase.from_epoch + 1
    if index == 0 or not phase.ramp_epochs or done >= phase.ramp_epochs:
        return dict(phase.weights)
    start = setting[index - 1].weights  # reached: a ramp ends before the next phase starts (check_phases)
    share = done / phase.ramp_epochs
    return {key: start.get(key, DEFAULT_WEIGHT) + share * (phase.weights.get(key, DEFAULT_WEIGHT)
                                                            - start.get(key, DEFAULT_WEIGHT))
            for key in sorted(set(start) | set(phase.weights))}


def phase_index(phases: list[Phase], epoch: int, row: int = 0) -> int:
    """The index of the phase row `row` of `epoch` is in."""
    return max(i for i, phase in enumerate(phases) if (phase.from_epoch, phase.from_row) <= (epoch, row))


def next_change(setting: Weights | None, epoch: int) -> int | None:
    """The first epoch after `epoch` whose weights at its start differ from those at `epoch`'s last row, or in which
    a phase starts inside (None: none)."""
    if setting is None or isinstance(setting, dict):
        return None
    now = weights_at(setting, epoch, max([0, *rows_inside(setting, epoch)]))
    last = max(phase.from_epoch + phase.ramp_epochs for phase in setting)
    for later in range(epoch + 1, last + 1):
        if weights_at(setting, later) != now or rows_inside(setting, later):
            return later
    return None
