"""The stage contract: every stage of the data path implements `Stage` (iterate, get_state, set_state), and its
state schema is a `StageState` defined beside it."""

from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from sigil_feed.server import builders, cached, pipeline, streaming
from sigil_feed.server.pipeline.stage import Stage, StageState

PACKAGES = (pipeline, streaming, cached, builders)
POSITION_METHODS = ("get_state", "set_state", "position", "seek", "__next__")
"""A class with any of these keeps or moves a position: it is a stage (file-like readers aside)."""
EXPECTED = {"Source", "RowSource", "JsonlSource", "ParquetSource", "HfSource", "CuratedSource", "Mixer",
            "BlockShuffle", "TokenizedBlocks", "TokenStream", "Packer", "CachedPacker", "PartRecords"}


def defined_classes() -> list[type]:
    """Every class defined in the data path's stage packages."""
    found = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            found += [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    return found


CLASSES = defined_classes()
STAGES = [c for c in CLASSES if issubclass(c, Stage) and c is not Stage]


def schema_of(stage: type) -> type:
    """S of the `Stage[T, S]` a stage class (or its nearest stage base) names in its class line."""
    for cls in stage.__mro__:
        for base in getattr(cls, "__orig_bases__", ()):
            if get_origin(base) is Stage:
                return get_args(base)[1]
    raise AssertionError(f"{stage} names no Stage[item, state]")


def test_every_class_that_keeps_a_position_is_a_stage() -> None:
    positional = [c for c in CLASSES if not issubclass(c, io.IOBase)
                  and any(m in vars(c) for m in POSITION_METHODS)]
    assert [c.__qualname__ for c in positional if not issubclass(c, Stage)] == []
    assert {c.__name__ for c in STAGES} == EXPECTED


@pytest.mark.parametrize("stage", STAGES, ids=lambda c: c.__name__)
def test_a_stage_states_its_position_in_a_schema_defined_beside_it(stage: type[Stage[Any, Any]]) -> None:
    schema = schema_of(stage)
    assert isinstance(schema, type) and issubclass(schema, StageState)
    if not inspect.isabstract(stage):
        assert get_type_hints(stage.get_state)["return"] is schema
        assert get_type_hints(stage.set_state)["state"] is schema
    homes = {base.__module__ for base in stage.__mro__ if issubclass(base, Stage) and base is not Stage}
    if schema.__module__ not in homes:  # a stage whose position is its parent's (as a filter's)
        assert stage.__name__ in {"TokenizedBlocks", "PartRecords"}, (stage, schema)
    assert inspect.isabstract(stage) == (stage.__name__ == "Source")
