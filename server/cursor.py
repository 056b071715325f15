"""Stream cursors: small, versioned, signed bytes that say where a rank's stream resumes.

Layout: one version byte, a 16-byte tag, then zlib-compressed JSON {"fp": dataset fingerprint, "rank",
"world", "epoch", "state": the packer's composed stage state}. The tag is an HMAC-SHA256 keyed by the
server's cursor secret (`server.cursor_secret_env`; empty when unset) over the version and the body, which
holds the fingerprint; so a cursor resumes only the dataset, fingerprint and rank layout it was made for, on
any server with the same secret, and anything else is FAILED_PRECONDITION. The state is checked against
the schema of each stage's state before any stage sees it.

Version 1, the released server's cursors (one version byte, then the same compressed JSON, no tag), still
resumes where no cursor secret is configured: there the tag only detects corruption, which the schema check
and the fingerprint also catch. A server with a secret refuses them, since anyone could have made one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from .errors import RequestError
from .stage import State

VERSION = 2
UNSIGNED = 1  # the released server's cursors: no tag
TAG_BYTES = 16
MAX_JSON = 64 << 10  # a real cursor's JSON is a few hundred bytes; refuse decompression bombs
MAX_EPOCH = (1 << 31) - 1  # epochs travel as uint32 on the wire, with room for the next one

Count = Annotated[StrictInt, Field(ge=0, lt=1 << 53)]
"""A position or a counter: a JSON integer, never negative, exact in any JSON reader."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CachedState(_Schema):
    """A cached-mode packer: position in the rank's token stream and batches sent this epoch."""

    pos: Count
    batches: Count


class SourceState(_Schema):
    """A source: file index, row, and (plain JSONL) the byte offset of that row."""

    file: Count
    row: Count
    offset: Count | None = None


class CurateState(_Schema):
    """A curated source: the record's source position and the task-weight copies already yielded."""

    at: SourceState
    skip: Count


class MixState(_Schema):
    """The mix: turn counter, which sources ran out, and every source's position."""

    turn: Count
    exhausted: list[StrictBool]
    done: StrictBool
    children: list[CurateState] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_flag_per_source(self) -> MixState:
        if len(self.exhausted) != len(self.children):
            raise ValueError("exhausted and children must have one entry per source")
        return self


class OrderState(_Schema):
    """The streaming order: block index, the mix at the block's start, samples of the share taken."""

    block: Count
    start: MixState
    taken: Count


class PackerState(_Schema):
    """A streaming packer: the sample being emitted, its tokens out, batches and wraps so far."""

    at: OrderState
    offset: Count
    batches: Count
    wraps: Count


class _Body(_Schema):
    fp: Annotated[str, Field(min_length=1, max_length=64)]
    rank: Count
    world: Annotated[StrictInt, Field(ge=1, lt=1 << 32)]
    epoch: Annotated[StrictInt, Field(ge=0, le=MAX_EPOCH)]
    state: CachedState | PackerState | None


@dataclass(frozen=True)
class Cursor:
    """A decoded cursor: whose stream it is and where it stands."""

    fingerprint: str
    rank: int
    world_size: int
    epoch: int
    state: State | None  # None: the start of `epoch`

    def encode(self, secret: bytes = b"") -> bytes:
        """The wire form, signed with `secret`."""
        body = {"fp": self.fingerprint, "rank": self.rank, "world": self.world_size,
                "epoch": self.epoch, "state": self.state}
        payload = zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 9)
        return bytes([VERSION]) + _tag(secret, payload) + payload


def _tag(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, bytes([VERSION]) + payload, hashlib.sha256).digest()[:TAG_BYTES]


def refused(message: str) -> RequestError:
    """A FAILED_PRECONDITION about the resume cursor."""
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"cursor: {message}")


def _body(payload: bytes) -> Any:
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(payload, MAX_JSON)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("cursor is truncated or expands beyond its limit")
        return json.loads(text)
    except (ValueError, zlib.error):
        raise refused("not a sigil-feed cursor (corrupt or truncated)") from None


def decode_cursor(data: bytes, *, fingerprint: str, rank: int, world_size: int, secret: bytes = b"") -> Cursor:
    """Parse, authenticate and check a cursor against the stream it is meant to resume."""
    if data[:1] == bytes([UNSIGNED]):
        if secret:
            raise refused("unsigned cursor from an older server; the server has a cursor secret configured "
                          "(server.cursor_secret_env), so it resumes only cursors signed with it: start without a "
                          "cursor, or resume it on a server without a cursor secret")
        tag, payload = None, data[1:]
    elif data[:1] == bytes([VERSION]):
        tag, payload = data[1:1 + TAG_BYTES], data[1 + TAG_BYTES:]
    else:
        raise refused(f"unknown cursor version (this server reads versions {UNSIGNED} and {VERSION}); "
                      "start without a cursor")
    raw = _body(payload)
    if isinstance(raw, dict) and raw.get("fp") not in (None, fingerprint):
        raise refused("made for another dataset configuration (sources, filters or tokenizer changed); "
                      "start without a cursor or restore the old configuration")
    if tag is not None and not hmac.compare_digest(tag, _tag(secret, payload)):
        raise refused("not made by this server (its signature does not match: corrupt, edited, or made with "
                      "another server.cursor_secret_env)")
    try:
        body = _Body.model_validate(raw)
    except ValidationError:
        raise refused("holds no valid stream position (corrupt, or made by another sigil-feed version)") from None
    if (body.rank, body.world) != (rank, world_size):
        raise refused(f"made for rank {body.rank} of {body.world}, not rank {rank} of {world_size}")
    state = None if body.state is None else body.state.model_dump(exclude_none=True)
    return Cursor(body.fp, body.rank, body.world, body.epoch, state)
