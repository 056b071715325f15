"""A position that follows the batch: every batch carries the feed state that resumes right after it."""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from typing import Any, TypeGuard

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


CURSOR_VERSION = 3
"""The cursor layout this client reads: one version byte, a 16-byte signature, then zlib-compressed JSON
{"fp": dataset fingerprint, "epoch", "seq_len", "state": null or {"row": global row, ...}} (server/cursor.py)."""
_OLD_ORDER_VERSIONS = (1, 2)
_TAG_BYTES = 16
_MAX_CURSOR_JSON = 64 << 10


@dataclass(frozen=True)
class CursorPosition:
    """Where a cursor resumes, as its own bytes say: the dataset's fingerprint, the epoch, the row length and the
    global row of the epoch where the next step starts. The empty cursor is the start of epoch 0 (fingerprint and
    seq_len None: it fits any)."""

    fingerprint: str | None
    epoch: int
    seq_len: int | None
    row: int


def cursor_position(cursor: str | bytes) -> CursorPosition:
    """Read a cursor's position from its bytes (or a state dict's base64 text); ValueError if it has none.

    The signature is not checked (the client has no secret; the server checks it when the cursor comes back):
    this is for comparing positions, e.g. of the ranks in a checkpoint.
    """
    try:
        raw = decode_cursor(cursor)
    except (binascii.Error, UnicodeError):
        raise ValueError("the cursor is not base64 text (a corrupt or edited state)") from None
    if not raw:
        return CursorPosition(None, 0, None, 0)
    if raw[0] in _OLD_ORDER_VERSIONS:
        raise ValueError(f"the cursor (version {raw[0]}) was made by an older sigil-feed, whose positions are in the "
                         "order before virtual ranks; start the epoch without it (or finish that run on the older "
                         "server)")
    if raw[0] != CURSOR_VERSION:
        raise ValueError(f"the cursor has version {raw[0]}, which this client cannot read (it reads version "
                         f"{CURSOR_VERSION}): made by a newer sigil-feed? upgrade the client")
    body = _cursor_body(raw[1 + _TAG_BYTES:])
    state = body.get("state") if isinstance(body, dict) else None
    row = 0 if state is None else state.get("row") if isinstance(state, dict) else None
    fp, epoch, seq_len = (body.get(key) for key in ("fp", "epoch", "seq_len")) if isinstance(body, dict) else [None] * 3
    if not (isinstance(fp, str) and fp and _count(epoch) and _count(seq_len) and seq_len and _count(row)):
        raise ValueError("the cursor holds no stream position (corrupt, truncated or edited)")
    return CursorPosition(fp, epoch, seq_len, row)


def _cursor_body(payload: bytes) -> Any:
    """The JSON body of a cursor's compressed payload; ValueError if it is not one."""
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(payload, _MAX_CURSOR_JSON)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError
        return json.loads(text)
    except (ValueError, zlib.error):
        raise ValueError("the cursor is not a sigil-feed cursor (corrupt or truncated)") from None


def _count(value: object) -> TypeGuard[int]:
    """A JSON integer >= 0 (not a bool)."""
    return type(value) is int and value >= 0


def batch_state(batch: Any) -> FeedState:
    """The feed state that resumes right after `batch` (a batch FeedDataset yielded)."""
    state = getattr(batch, "feed_state", None)
    if state is None:
        raise FeedError(
            f"this batch ({type(batch).__name__}) carries no sigil-feed position: take it as FeedDataset "
            "yields it, before anything rebuilds the dict (moving it to a device, a precision plugin's "
            "input conversion)")
    return dict(state)
