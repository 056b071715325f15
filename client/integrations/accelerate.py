"""Accelerate: every rank's feed position in Accelerator.save_state(), each rank's restored by load_state().

    feed = FeedDataset(target, batch_size=16)
    model, optimizer = accelerator.prepare(model, optimizer)       # not the DataLoader
    accelerator.register_for_checkpointing(FeedCheckpoint(feed))
    for batch in DataLoader(feed, batch_size=None): ...

register_for_checkpointing(feed) alone would keep only the main process's position (only it writes the
file, and every rank would load it back); FeedCheckpoint gathers all of them. The position is the feed's
state_dict(), exact for a loop that does not fetch ahead (a plain DataLoader with num_workers=0).
"""

from __future__ import annotations

from typing import Any

from ..dataset import FeedDataset
from .ranks import gather_states, load_own_state


class FeedCheckpoint:
    """A checkpointable object (state_dict/load_state_dict) holding every rank's feed position."""

    def __init__(self, feed: FeedDataset) -> None:
        self.feed = feed

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position (a collective: save_state calls it on every rank)."""
        return gather_states(self.feed.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume this rank's stream right after its last saved batch."""
        load_own_state(self.feed, state)
