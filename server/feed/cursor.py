"""Stream cursors: small, versioned, signed bytes that say where an epoch's stream resumes.

Layout: one version byte, a 16-byte tag, then zlib-compressed JSON {"fp": dataset fingerprint, "epoch", "seq_len",
"state": the packer's composed stage state, "members": the epoch's membership once it has begun (the content
fingerprint of its sources' files: an epoch's data is fixed at its start, see served.py), "mix": the mixture the
epoch is served under (inside an epoch; mixtures.py; in cached mode a mixture names its membership when a source
was added or removed inside the epoch), "src": the source list's fingerprint (its kinds and filter overrides),
"names": in streaming mode inside an epoch, the epoch's sources (spec and filter override each; after a source was
added or removed inside the epoch, the union of its lists: stream_sources.py), "end": true after the epoch's last
step (cached mode; streaming mode once the stream's end was read)}. The tag is
an HMAC-SHA256 keyed by the server's cursor secret (`server.cursor_secret_env`; empty when unset) over the version
and the body, which holds the fingerprint; so a cursor resumes only the dataset configuration and row length it was
made for, on any server with the same secret, and anything else is FAILED_PRECONDITION. The state is the last
stage's state schema (`CachedState` in cached/packer.py, `StreamState` in streaming/packer.py, which compose the
schemas of the stages before them, each defined beside its stage), checked as a whole before any stage sees it; its
JSON is each schema's fields in order, a source's `offset` left out when it has none.

The position is global (see deal.py): the global row where the next window of the epoch starts, with, in
streaming mode, the stream's state at that row. It names no rank, so any rank's cursor after a step resumes
every rank of any world size. Versions 1 and 2 held a position in the order before virtual ranks (one
global permutation dealt rank by rank), which this order cannot continue: they are refused, saying so.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from ..cached.packer import CachedState
from ..errors import Refused
from ..streaming.packer import StreamState
from .mixtures import MixBody
from .source_names import SourceName

VERSION = 3
OLD_ORDER = (1, 2)  # cursors of the order before virtual ranks
TAG_BYTES = 16
MAX_JSON = 64 << 10  # a real cursor's JSON is a few hundred bytes; refuse decompression bombs
MAX_EPOCH = (1 << 31) - 1  # epochs travel as uint32 on the wire, with room for the next one

PackerState = CachedState | StreamState
"""A whole chain's position: its packer's state (cached or streaming mode)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    fp: Annotated[str, Field(min_length=1, max_length=64)]
    epoch: Annotated[StrictInt, Field(ge=0, le=MAX_EPOCH)]
    seq_len: Annotated[StrictInt, Field(ge=1, lt=1 << 32)]
    state: PackerState | None
    members: Annotated[str, Field(max_length=64)] = ""
    mix: list[MixBody] | None = Field(default=None, min_length=1, max_length=1024)
    src: Annotated[str, Field(max_length=64)] = ""
    names: list[SourceName] | None = Field(default=None, min_length=1, max_length=4096)
    end: bool = False


@dataclass(frozen=True)
class Cursor:
    """A decoded cursor: which epoch of which dataset, at which row length, and where in it."""

    fingerprint: str
    epoch: int
    seq_len: int
    state: PackerState | None  # None: the start of `epoch`
    members: str = ""  # the epoch's membership (the content fingerprint of its sources' files); "" before it starts
    mixture: list[MixBody] | None = None  # `epoch`'s plan (mixtures.py; None at its start: the configured one)
    sources: str = ""  # the source list it was made under (its kinds and filter overrides)
    ended: bool = False  # the position is after the epoch's last step (as far as the packer knows)
    names: list[SourceName] | None = None  # streaming mode inside an epoch: the epoch's sources (stream_sources.py)

    def encode(self, secret: bytes = b"") -> bytes:
        """The wire form, signed with `secret`."""
        state = None if self.state is None else self.state.model_dump(mode="json", exclude_none=True)
        body: dict[str, Any] = {"fp": self.fingerprint, "epoch": self.epoch, "seq_len": self.seq_len, "state": state}
        if self.members:
            body["members"] = self.members
        if self.mixture is not None:
            body["mix"] = [part.model_dump(mode="json", exclude_none=True) for part in self.mixture]
        if self.sources:
            body["src"] = self.sources
        if self.names is not None:
            body["names"] = [name.model_dump(mode="json", exclude_none=True) for name in self.names]
        if self.ended:
            body["end"] = True
        payload = zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 9)
        return bytes([VERSION]) + _tag(secret, payload) + payload


def _tag(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, bytes([VERSION]) + payload, hashlib.sha256).digest()[:TAG_BYTES]


def refused(message: str) -> Refused:
    """A FAILED_PRECONDITION about the resume cursor."""
    return Refused(f"cursor: {message}")


def _body(payload: bytes) -> Any:
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(payload, MAX_JSON)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("cursor is truncated or expands beyond its limit")
        return json.loads(text)
    except (ValueError, zlib.error):
        raise refused("not a sigil-feed cursor (corrupt or truncated)") from None


def decode_cursor(data: bytes, *, fingerprint: str, seq_len: int, secret: bytes = b"") -> Cursor:
    """Parse, authenticate and check a cursor against the stream it is meant to resume."""
    if data[:1] and data[0] in OLD_ORDER:
        raise refused("made by an older sigil-feed, whose positions are in the order before virtual ranks (one "
                      "global permutation dealt rank by rank); this order deals global rows, so that position "
                      "has no place in it: start the epoch without a cursor (or finish the run with the older "
                      "server)")
    if data[:1] != bytes([VERSION]):
        raise refused(f"unknown cursor version (this server reads version {VERSION}); start without a cursor")
    tag, payload = data[1:1 + TAG_BYTES], data[1 + TAG_BYTES:]
    raw = _body(payload)
    if isinstance(raw, dict) and raw.get("fp") not in (None, fingerprint):
        raise refused("made for another dataset configuration (filters, order or tokenizer changed); "
                      "start without a cursor or restore the old configuration")
    if not hmac.compare_digest(tag, _tag(secret, payload)):
        raise refused("not made by this server (its signature does not match: corrupt, edited, or made with "
                      "another server.cursor_secret_env)")
    try:
        body = _Body.model_validate(raw)
    except ValidationError:
        raise refused("holds no valid stream position (corrupt, or made by another sigil-feed version)") from None
    if body.seq_len != seq_len:
        raise refused(f"made for rows of {body.seq_len} tokens, this stream asks for {seq_len}: positions count "
                      f"rows, so resume with seq_len {body.seq_len}")
    return Cursor(body.fp, body.epoch, body.seq_len, body.state, body.members, body.mix, body.src,
                  body.end, body.names)
