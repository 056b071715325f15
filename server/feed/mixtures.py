"""A served dataset's mixture per epoch: its source weights and task weights, from the config's schedules, or the
one a resume cursor carries for the epoch it continues.

An epoch is served under one mixture from its first row to its last, so a resumed epoch continues under the
mixture it started with (the cursor carries it) even when the configuration changed since: nothing of the epoch
is served twice or skipped. A changed mixture takes effect at the next epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ..config import DatasetSection
from ..errors import ConfigError, Refused
from ..pipeline.schedule import DEFAULT_WEIGHT, Weights, keys, next_change, weights_at

log = logging.getLogger(__name__)

CHANGES_KEPT = 8  # accepted mixture changes remembered for GetStats


class MixBody(BaseModel):
    """The mixture an epoch is served under: source weights by source name, task weights (None: one copy each)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    w: dict[Annotated[str, Field(min_length=1)], Annotated[float, Field(gt=0)]]
    t: dict[str, Annotated[float, Field(gt=0)]] | None = None


@dataclass(frozen=True)
class Mixture:
    """The weights one epoch is served under: a weight per source (in `names` order) and the task weights."""

    weights: tuple[float, ...]
    tasks: tuple[tuple[str, float], ...] | None  # sorted by task; None: every task once

    @property
    def task_weights(self) -> dict[str, float] | None:
        """The task weights as the curate stage takes them."""
        return None if self.tasks is None else dict(self.tasks)

    def body(self, specs: list[str]) -> MixBody:
        """The mixture as a cursor carries it (sources by name)."""
        return MixBody(w=dict(zip(specs, self.weights, strict=True)), t=self.task_weights)

    def describe(self, specs: list[str]) -> str:
        """The mixture for people: `a=1 b=0.5; tasks: explain=2`."""
        text = " ".join(f"{spec}={weight:g}" for spec, weight in zip(specs, self.weights, strict=True))
        return text + ("" if self.tasks is None else "; tasks: " + " ".join(f"{k}={v:g}" for k, v in self.tasks))


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
        self.latest_epoch = 0  # the latest epoch a stream opened (GetStats shows its mixture)

    def opened(self, epoch: int) -> None:
        """A stream opened `epoch`."""
        self.latest_epoch = max(self.latest_epoch, epoch)

    def at(self, epoch: int) -> Mixture:
        """The configured mixture of `epoch`."""
        weights = weights_at(self.dataset_weights, epoch) or {}
        tasks = weights_at(self.task_weights, epoch)
        return Mixture(tuple(weights.get(spec, DEFAULT_WEIGHT) for spec in self.specs),
                       None if tasks is None else tuple(sorted(tasks.items())))

    def next_change(self, epoch: int) -> int | None:
        """The first epoch after `epoch` whose configured mixture differs (None: none)."""
        changes = [e for e in (next_change(self.dataset_weights, epoch), next_change(self.task_weights, epoch))
                   if e is not None]
        return min(changes) if changes else None

    def resumed(self, epoch: int, carried: MixBody | None) -> Mixture:
        """The mixture a cursor inside `epoch` continues under: the one it carries (logged and kept for GetStats
        when the configuration's differs); FAILED_PRECONDITION when it names a source this dataset lacks."""
        configured = self.at(epoch)
        if carried is None:
            return configured
        if set(carried.w) != set(self.specs):
            raise Refused(f"cursor: made under a mixture of the sources {sorted(carried.w)}, but this dataset's are "
                          f"{self.specs}: sources cannot change inside an epoch")
        mixture = Mixture(tuple(carried.w[spec] for spec in self.specs),
                          None if carried.t is None else tuple(sorted(carried.t.items())))
        if mixture != configured:
            change = (f"epoch {epoch} continues under its checkpoint's mixture ({mixture.describe(self.specs)}), "
                      f"not the configured one ({configured.describe(self.specs)}); the configuration's mixtures "
                      f"apply from epoch {epoch + 1} ({self.at(epoch + 1).describe(self.specs)})")
            if change not in self.changes:
                log.info("mixture changed on resume: %s", change)
                self.changes = [*self.changes, change][-CHANGES_KEPT:]
        return mixture
