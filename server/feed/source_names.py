"""A source list as a streaming cursor carries it (stream_sources.py): each source's spec and filter override."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..config import SourceSpec


class SourceName(BaseModel):
    """One source of an epoch's list: its spec (`names` entry) and filter override."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    n: str = Field(min_length=1, max_length=4096)
    f: bool | None = None

    @property
    def spec(self) -> SourceSpec:
        """The source as `dataset.names` holds it."""
        return SourceSpec(name=self.n, filter=self.f)


def names_of(specs: list[SourceSpec]) -> list[SourceName]:
    """A source list as a cursor carries it."""
    return [SourceName(n=spec.name, f=spec.filter) for spec in specs]
