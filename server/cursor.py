"""Stream cursors: small, versioned bytes that say where a rank's stream resumes.

Layout: one version byte, then zlib-compressed JSON {"fp": dataset fingerprint, "rank", "world",
"epoch", "state": the packer's composed stage state}. A cursor only resumes the dataset, fingerprint
and rank layout it was made for; anything else is FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

import grpc

from .errors import RequestError
from .stage import State

VERSION = 1
MAX_JSON = 64 << 10  # a real cursor's JSON is a few hundred bytes; refuse decompression bombs


@dataclass(frozen=True)
class Cursor:
    """A decoded cursor: whose stream it is and where it stands."""

    fingerprint: str
    rank: int
    world_size: int
    epoch: int
    state: State | None  # None: the start of `epoch`

    def encode(self) -> bytes:
        """The wire form."""
        body = {"fp": self.fingerprint, "rank": self.rank, "world": self.world_size,
                "epoch": self.epoch, "state": self.state}
        return bytes([VERSION]) + zlib.compress(json.dumps(body, separators=(",", ":")).encode(), 9)


def _refuse(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"cursor: {message}")


def decode_cursor(data: bytes, *, fingerprint: str, rank: int, world_size: int) -> Cursor:
    """Parse and check a cursor against the stream it is meant to resume."""
    if not data or data[0] != VERSION:
        raise _refuse(f"unknown cursor version (this server reads version {VERSION})")
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(data[1:], MAX_JSON)
        if inflater.unconsumed_tail:
            raise ValueError("cursor expands beyond its limit")
        body = json.loads(text)
        cursor = Cursor(str(body["fp"]), int(body["rank"]), int(body["world"]), int(body["epoch"]),
                        body["state"])
    except (ValueError, KeyError, TypeError, zlib.error):
        raise _refuse("not a sigil-feed cursor (corrupt or truncated)") from None
    if cursor.fingerprint != fingerprint:
        raise _refuse("made for another dataset configuration (sources, filters or tokenizer changed); "
                      "start without a cursor or restore the old configuration")
    if (cursor.rank, cursor.world_size) != (rank, world_size):
        raise _refuse(f"made for rank {cursor.rank} of {cursor.world_size}, "
                      f"not rank {rank} of {world_size}")
    return cursor
