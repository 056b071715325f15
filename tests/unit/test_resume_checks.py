"""resume_state trusts the cursors, not the metadata beside them: every bad checkpoint is a clear ValueError."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import pytest

from sigil_feed.client.integrations.ranks import resume_state
from sigil_feed.client.position import CursorPosition, cursor_position


def cursor(epoch: int, row: int, fp: str = "fp", seq_len: int = 64, version: int = 3) -> str:
    """A state dict's cursor (base64) laid out as the server writes one (server/cursor.py), at (epoch, row)."""
    state = {"row": row, "virtual": 8} if row else None
    body = json.dumps({"fp": fp, "epoch": epoch, "seq_len": seq_len, "state": state}).encode()
    return base64.b64encode(bytes([version]) + bytes(16) + zlib.compress(body)).decode()


def state(rank: int, world: int, epoch: int = 0, row: int = 96, **fields: Any) -> dict[str, Any]:
    """Rank `rank`'s saved state at (epoch, row), its fields agreeing with its cursor unless overridden."""
    return {"cursor": cursor(epoch, row), "epoch": epoch, "row": row, "dataset": "default", "rank": rank,
            "world_size": world, **fields}


def test_the_client_reads_a_cursors_position_from_its_bytes() -> None:
    assert cursor_position(cursor(3, 120, fp="abc", seq_len=2048)) == CursorPosition("abc", 3, 2048, 120)
    assert cursor_position(cursor(2, 0)) == CursorPosition("fp", 2, 64, 0)  # an epoch's start: no state
    assert cursor_position("") == CursorPosition(None, 0, None, 0)
    assert cursor_position(base64.b64decode(cursor(1, 8))) == CursorPosition("fp", 1, 64, 8)


def test_the_same_world_size_checks_that_each_state_is_its_ranks() -> None:
    """Before: states[rank] was handed out whatever rank it said it was."""
    swapped = [state(0, 4), state(2, 4, row=72), state(1, 4), state(3, 4)]
    with pytest.raises(ValueError, match=r"entry for rank 1 is the state of rank 2: the states are out of order"):
        resume_state(swapped, 1, 4)


def test_another_world_size_compares_what_the_cursors_say() -> None:
    """Before: rank 1's fields said row 96 like the others, so its cursor (row 72) went unnoticed, and rank 0's
    cursor was handed to every new rank; with rank 0's cursor off instead, 24 rows were skipped silently."""
    lying = [state(0, 2), {**state(1, 2, row=72), "row": 96}]
    with pytest.raises(ValueError, match=r"rank 1's saved state says epoch 0 row 96, but its cursor resumes at "
                                         r"epoch 0 row 72"):
        resume_state(lying, 0, 1)
    ahead = [{**state(0, 2, row=120), "row": 96}, state(1, 2)]
    with pytest.raises(ValueError, match=r"rank 0's saved state says epoch 0 row 96, but its cursor .* row 120"):
        resume_state(ahead, 0, 3)


def test_cursors_of_different_positions_or_datasets_cannot_resume_on_another_world_size() -> None:
    other_epoch = [state(0, 2), state(1, 2, epoch=1)]
    with pytest.raises(ValueError, match=r"rank 0 at epoch 0 row 96, rank 1 at epoch 1 row 96"):
        resume_state(other_epoch, 0, 1)
    other_config = [state(0, 2), {**state(1, 2), "cursor": cursor(0, 96, fp="other")}]
    with pytest.raises(ValueError, match="stopped at different positions"):
        resume_state(other_config, 0, 1)
    with pytest.raises(ValueError, match="different datasets"):
        resume_state([state(0, 2), state(1, 2, dataset="code")], 0, 1)


def test_an_empty_checkpoint_is_a_value_error() -> None:
    """Before: IndexError."""
    with pytest.raises(ValueError, match="holds no feed position"):
        resume_state([], 0, 1)
    with pytest.raises(ValueError, match=r"lacks the feed position of rank\(s\) \[0, 1\]"):
        resume_state([None, None], 0, 1)


@pytest.mark.parametrize(("entry", "message"), [
    ("not a state", "entry for rank 1 is not a sigil-feed state"),
    ({"epoch": 0, "row": 96, "rank": 1, "world_size": 2}, "entry for rank 1 is not a sigil-feed state"),
    ({**state(1, 2), "cursor": "%%%"}, "rank 1's saved feed position cannot be read: .*not base64"),
    ({**state(1, 2), "cursor": base64.b64encode(b"\x03" + bytes(16) + b"garbage").decode()},
     "rank 1's .* cannot be read: .*corrupt or truncated"),
    ({**state(1, 2), "cursor": cursor(0, 96)[:-8]}, "rank 1's .* cannot be read"),
    ({**state(1, 2), "cursor": cursor(0, 96, version=2)}, "older sigil-feed"),
    ({**state(1, 2), "cursor": cursor(0, 96, version=9)}, "version 9, which this client cannot read"),
    ({**state(1, 2), "cursor": base64.b64encode(b"\x03" + bytes(16) + zlib.compress(b'{"fp": "x"}')).decode()},
     "holds no stream position"),
    ({**state(1, 2), "world_size": 3}, r"different world sizes \(\['2', '3'\]\)"),
])
def test_every_unreadable_or_inconsistent_entry_is_a_value_error(entry: Any, message: str) -> None:
    for world in (2, 1):
        with pytest.raises(ValueError, match=message):
            resume_state([state(0, 2), entry], 0, world)


def test_more_entries_than_the_states_say_ranks_saved_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="holds 3 ranks' entries, but its states say 2"):
        resume_state([state(0, 2), state(1, 2), None], 0, 2)


def test_a_good_checkpoint_still_resumes_every_rank() -> None:
    four = [state(r, 4) for r in range(4)]
    assert [resume_state(four, r, 4)["rank"] for r in range(4)] == [0, 1, 2, 3]
    assert {resume_state(four, r, 3)["cursor"] for r in range(3)} == {cursor(0, 96)}
    fresh = [state(r, 2, row=0, epoch=None, cursor="") for r in range(2)]  # saved before the first batch
    assert resume_state(fresh, 0, 1)["cursor"] == ""
