"""A position that follows the batch: every batch carries the feed state that resumes right after it."""

from __future__ import annotations

import base64
from typing import Any

from .stream import FeedError

FeedState = dict[str, Any]
"""A resumable feed position: cursor (base64 text), epoch, row (the global row where the next step starts),
dataset, and the rank and world_size that saved it; plain types only, so it loads with
torch.load(weights_only=True) and serialises as JSON."""


class PositionedBatch(dict[str, Any]):
    """A batch of model inputs (a plain dict to the model) that remembers the feed state after it.

    The state survives what a DataLoader does to a batch (pin_memory, worker processes: both copy the
    dict with its attributes); code that rebuilds the dict (`type(batch)({...})`) drops it.
    """

    feed_state: FeedState | None = None


def encode_cursor(cursor: bytes) -> str:
    """A cursor as text (base64), the form a state dict keeps it in."""
    return base64.b64encode(cursor).decode("ascii")


def decode_cursor(cursor: str | bytes) -> bytes:
    """The cursor bytes of a state dict's cursor (text, or raw bytes from older states)."""
    return cursor if isinstance(cursor, bytes) else base64.b64decode(cursor.encode("ascii"), validate=True)


def batch_state(batch: Any) -> FeedState:
    """The feed state that resumes right after `batch` (a batch FeedDataset yielded)."""
    state = getattr(batch, "feed_state", None)
    if state is None:
        raise FeedError(
            f"this batch ({type(batch).__name__}) carries no sigil-feed position: take it as FeedDataset "
            "yields it, before anything rebuilds the dict (moving it to a device, a precision plugin's "
            "input conversion)")
    return dict(state)
