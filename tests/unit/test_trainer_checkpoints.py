"""Which FeedTrainer checkpoints are complete, and the states a run of another size resumes from.

hf_trainer imports transformers' Trainer (seconds of CPU), so the tests import it when they run, not while every
pytest-xdist worker collects.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sigil_feed.client.integrations.ranks import resume_state
from tests.unit.test_resume_checks import cursor


def checkpoint(root: Path, step: int, world: int, ranks: list[int], trainer_state: bool = True) -> Path:
    """checkpoint-STEP as `world` ranks of FeedTrainer write it, holding the positions of `ranks`."""
    from sigil_feed.client.integrations.hf_trainer import TRAINER_STATE, feed_state_file

    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for rank in ranks:
        torch.save({"cursor": cursor(0, 8 * step), "epoch": 0, "row": 8 * step, "rank": rank, "world_size": world},
                   folder / feed_state_file(rank))
    if trainer_state:
        (folder / TRAINER_STATE).write_text("{}")
    return folder


def test_a_checkpoint_is_complete_with_every_position_of_the_ranks_that_wrote_it(tmp_path: Path) -> None:
    from sigil_feed.client.integrations.hf_trainer import complete_checkpoints, saved_states

    four = checkpoint(tmp_path, 10, 4, [0, 1, 2, 3])
    checkpoint(tmp_path, 12, 4, [0, 1, 3])  # a rank was killed while saving
    checkpoint(tmp_path, 14, 4, [0, 1, 2, 3], trainer_state=False)  # the Trainer never finished it
    checkpoint(tmp_path, 16, 4, [1, 2, 3])  # rank 0's position lost: nothing says how many ranks saved it
    assert complete_checkpoints(tmp_path) == [four]
    states = saved_states(four)
    assert [s["rank"] for s in states if s] == [0, 1, 2, 3]
    assert [resume_state(states, rank, 3)["row"] for rank in range(3)] == [80, 80, 80]
    assert saved_states(tmp_path / "checkpoint-12")[2] is None
