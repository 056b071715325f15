"""The one interface every stage shares: iterate, and report or restore its position as its own state schema.

Each stage defines its state schema beside it, a `StageState` (a pydantic model: small, JSON-serialisable,
checked whenever one is made or decoded), and composes its parent's state into its own; so the state of the last
stage, the packer, is the whole chain's position, which the stream cursor (feed/cursor.py) versions and signs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt

Count = Annotated[StrictInt, Field(ge=0, lt=1 << 53)]
"""A position or a counter: a JSON integer, never negative, exact in any JSON reader."""


class StageState(BaseModel):
    """A stage's position: enough to resume right before its next item (fields exact, none unknown)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


T_co = TypeVar("T_co", covariant=True)
S = TypeVar("S", bound=StageState)


class Stage(ABC, Generic[T_co, S]):
    """An iterator whose position can be saved between items and restored later."""

    def __iter__(self) -> Iterator[T_co]:
        return self

    @abstractmethod
    def __next__(self) -> T_co:
        """The next item; StopIteration at the end."""

    @abstractmethod
    def get_state(self) -> S:
        """The position right before the next item this stage will yield."""

    @abstractmethod
    def set_state(self, state: S) -> None:
        """Continue from a position returned by get_state (of an identically configured stage); ValueError for a
        position this stage never reaches."""
