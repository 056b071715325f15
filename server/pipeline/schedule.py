"""Mixture schedules: `dataset_weights` and `task_weights` as a constant mapping or as phases over the run's epochs.

A phase starts at `from_epoch` and holds its weights until the next phase starts; with `ramp_epochs: n` it goes
there in n equal linear steps from the previous phase's weights (epoch from_epoch gets 1/n of the way, epoch
from_epoch + n - 1 the phase's weights). A key a mapping leaves out weighs 1.0 (a source's default weight, and a
task's single copy), so a ramp may bring a key in or out. An epoch's mixture is fixed for the whole epoch: every
rank, layout and resume sees the same one (see served.Mixtures).
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
        raise ValueError(f"{where}: {first['msg']} (a phase is {{from_epoch, weights, ramp_epochs}})") from None


def check_phases(phases: list[Phase]) -> list[Phase]:
    """The phases, if they start at epoch 0, rise strictly, and ramp only into a later phase; ValueError
    otherwise."""
    if not phases:
        raise ValueError("a schedule needs at least one phase (or give a plain mapping)")
    if phases[0].from_epoch != 0:
        raise ValueError(f"the first phase must have from_epoch: 0, not {phases[0].from_epoch}")
    if phases[0].ramp_epochs:
        raise ValueError("the first phase has nothing to ramp from: remove its ramp_epochs")
    for before, after in pairwise(phases):
        if after.from_epoch <= before.from_epoch:
            raise ValueError(f"phases must rise strictly by from_epoch ({before.from_epoch} then {after.from_epoch})")
        if before.from_epoch + before.ramp_epochs > after.from_epoch:
            raise ValueError(f"the ramp of the phase from epoch {before.from_epoch} runs past epoch "
                             f"{after.from_epoch}, where the next phase starts")
    return phases


def keys(setting: Weights | None) -> set[str]:
    """Every key the setting names, in any phase."""
    if setting is None:
        return set()
    if isinstance(setting, dict):
        return set(setting)
    return {key for phase in setting for key in phase.weights}


def weights_at(setting: Weights | None, epoch: int) -> dict[str, float] | None:
    """The weights in force in `epoch` (None: no setting, every weight 1.0)."""
    if setting is None or isinstance(setting, dict):
        return None if setting is None else dict(setting)
    index = phase_index(setting, epoch)
    phase = setting[index]
    done = epoch - phase.from_epoch + 1
    if index == 0 or not phase.ramp_epochs or done >= phase.ramp_epochs:
        return dict(phase.weights)
    start = setting[index - 1].weights  # reached: a ramp ends before the next phase starts (check_phases)
    share = done / phase.ramp_epochs
    return {key: start.get(key, DEFAULT_WEIGHT) + share * (phase.weights.get(key, DEFAULT_WEIGHT)
                                                            - start.get(key, DEFAULT_WEIGHT))
            for key in sorted(set(start) | set(phase.weights))}


def phase_index(phases: list[Phase], epoch: int) -> int:
    """The index of the phase `epoch` is in."""
    return max(i for i, phase in enumerate(phases) if phase.from_epoch <= epoch)


def next_change(setting: Weights | None, epoch: int) -> int | None:
    """The first epoch after `epoch` whose weights differ from `epoch`'s (None: none does)."""
    if setting is None or isinstance(setting, dict):
        return None
    now = weights_at(setting, epoch)
    last = max(phase.from_epoch + phase.ramp_epochs for phase in setting)
    for later in range(epoch + 1, last + 1):
        if weights_at(setting, later) != now:
            return later
    return None
