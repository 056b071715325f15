"""The one interface every pipeline stage shares: iterate, and report or restore its position."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

T_co = TypeVar("T_co", covariant=True)

State = dict[str, Any]
"""A stage's position: small, JSON-serialisable, enough to resume right before its next item."""


class Stage(Iterator[T_co], Protocol):
    """An iterator whose position can be saved between items and restored later."""

    def get_state(self) -> State:
        """The position right before the next item this stage will yield."""
        ...

    def set_state(self, state: State) -> None:
        """Continue from a position returned by get_state (of an identically configured stage)."""
        ...
