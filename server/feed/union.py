"""Streaming mode: an epoch served over the union of its source lists (a source added or removed inside it,
stream_sources.py), as the chain that serves it sees it: the sources, their files, and which of them a mixture
draws."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SourceSpec
from .membership import Membership
from .mixtures import Mixture
from .source_names import SourceName


def active_of(mixture: Mixture) -> list[int] | None:
    """The positions in the epoch's source list of the sources a streaming mixture is over (None: the first ones,
    one per weight)."""
    return [int(i) for i in mixture.members.split(",")] if mixture.members else None


@dataclass(frozen=True)
class StreamUnion:
    """A streaming epoch served over the union of its source lists: the sources, their files (a membership over
    them), and the code of the current list's sources in it (`Mixture.members`)."""

    names: list[SourceName]
    membership: Membership
    current: str

    @property
    def specs(self) -> list[SourceSpec]:
        return [name.spec for name in self.names]
