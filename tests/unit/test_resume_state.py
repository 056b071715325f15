"""Which saved feed state each rank resumes from: its own on the same world size, the shared position on another."""

from __future__ import annotations

from typing import Any

import pytest

from sigil_feed.client.integrations.ranks import resume_state
from tests.unit.test_resume_checks import cursor


def saved(world: int, rows: list[int] | None = None, epoch: int = 0) -> list[dict[str, Any] | None]:
    """The states `world` ranks saved after a step (rank r at rows[r], by default all at row 96)."""
    rows = rows or [96] * world
    return [{"cursor": cursor(epoch, rows[r]), "epoch": epoch, "row": rows[r], "dataset": "default", "rank": r,
             "world_size": world} for r in range(world)]


def test_the_same_world_size_resumes_each_rank_from_its_own_state_even_at_different_steps() -> None:
    states = saved(4, rows=[96, 96, 72, 96])
    assert [resume_state(states, r, 4)["rank"] for r in range(4)] == [0, 1, 2, 3]
    assert [resume_state(states, r, 4)["row"] for r in range(4)] == [96, 96, 72, 96]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_another_world_size_resumes_every_rank_from_the_shared_position(world: int) -> None:
    states = saved(4)
    assert {resume_state(states, r, world)["row"] for r in range(world)} == {96}


def test_an_incomplete_set_is_refused_naming_the_missing_ranks() -> None:
    states = saved(4)
    states[2] = None
    with pytest.raises(ValueError, match=r"lacks the feed position of rank\(s\) \[2\] of the 4"):
        resume_state(states, 0, 2)
    with pytest.raises(ValueError, match=r"rank\(s\) \[2, 3\] of the 4"):
        resume_state(saved(4)[:2], 0, 2)  # two of four files: the states say four ranks saved
    with pytest.raises(ValueError, match=r"rank\(s\) \[2\]"):
        resume_state(states, 0, 4)


def test_ranks_at_different_positions_cannot_resume_on_another_world_size() -> None:
    with pytest.raises(ValueError, match=r"rank 2 at epoch 0 row 72.*resume on 4 ranks instead"):
        resume_state(saved(4, rows=[96, 96, 72, 96]), 0, 2)
