"""resume_state against real cursors: the client reads the server's cursors as the states describe them, and a
checkpoint whose metadata disagrees with a cursor is refused instead of resuming at the cursor's position."""

from __future__ import annotations

from pathlib import Path

import pytest

from sigil_feed.client.integrations.ranks import resume_state
from sigil_feed.client.position import cursor_position
from tests.integration.test_elastic import STEP_ROWS, config, read


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "cached"])
def test_real_cursors_say_what_their_states_say_and_a_contradiction_is_refused(
        tmp_path: Path, start_server, cached: bool) -> None:
    target = start_server(config(tmp_path, cached)).target
    _, three = read(target, 4, 3)
    _, four = read(target, 4, 4)
    positions = [cursor_position(state["cursor"]) for state in three]
    assert {(p.epoch, p.row, p.seq_len) for p in positions} == {(0, 3 * STEP_ROWS, 64)}
    assert all((state["epoch"], state["row"]) == (0, 3 * STEP_ROWS) for state in three)
    assert len({p.fingerprint for p in positions}) == 1
    assert resume_state(three, 1, 2)["row"] == 3 * STEP_ROWS
    # rank 0's cursor from one step later, its fields unchanged: the new ranks would skip that step's 24 rows
    mixed = [{**three[0], "cursor": four[0]["cursor"]}, *three[1:]]
    with pytest.raises(ValueError, match=rf"rank 0's saved state says epoch 0 row {3 * STEP_ROWS}, but its "
                                         rf"cursor resumes at epoch 0 row {4 * STEP_ROWS}"):
        resume_state(mixed, 0, 2)
