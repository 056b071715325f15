"""Cursors: round trip, signature, and the schema every decoded state must match."""

from __future__ import annotations

import hashlib
import hmac
import json
import zlib
from typing import Any

import grpc
import pytest

from sigil_feed.server.cached.packer import CachedState
from sigil_feed.server.errors import FeedError
from sigil_feed.server.feed.cursor import TAG_BYTES, VERSION, Cursor, decode_cursor
from sigil_feed.server.rpc.interceptor import status_of
from sigil_feed.server.streaming.packer import StreamState

FP = "0123456789abcdef"
CACHED = {"row": 96, "virtual": 12}
STREAMING = {"row": 40, "at": {"block": 0, "start": {"turn": 0, "exhausted": [False], "done": False,
                                                      "children": [{"at": {"file": 0, "row": 3, "offset": 120},
                                                                    "skip": 0}]},
                               "taken": 2}, "offset": 5, "wraps": 0}


def signed(body: Any, secret: bytes = b"") -> bytes:
    """A cursor holding any JSON body, signed as the server signs (see server/feed/cursor.py)."""
    payload = zlib.compress(json.dumps(body).encode())
    tag = hmac.new(secret, bytes([VERSION]) + payload, hashlib.sha256).digest()[:TAG_BYTES]
    return bytes([VERSION]) + tag + payload


def refusal(data: bytes, secret: bytes = b"", seq_len: int = 64) -> str:
    with pytest.raises(FeedError) as err:
        decode_cursor(data, fingerprint=FP, seq_len=seq_len, secret=secret)
    assert status_of(err.value)[0] == grpc.StatusCode.FAILED_PRECONDITION
    return str(err.value)


@pytest.mark.parametrize("state", [None, CachedState.model_validate(CACHED), StreamState.model_validate(STREAMING)])
def test_a_cursor_round_trips_with_its_secret(state: Any) -> None:
    data = Cursor(FP, 3, 64, state).encode(b"k")
    assert decode_cursor(data, fingerprint=FP, seq_len=64, secret=b"k") == Cursor(FP, 3, 64, state)


@pytest.mark.parametrize("state", [CACHED, STREAMING])
def test_the_wire_form_is_each_schemas_fields_in_order_and_nothing_else(state: dict[str, Any]) -> None:
    """The JSON body of version 3, byte for byte (cursors saved by earlier servers stay valid)."""
    model = (CachedState if "virtual" in state else StreamState).model_validate(state)
    payload = Cursor(FP, 3, 64, model).encode()[1 + TAG_BYTES:]
    body = {"fp": FP, "epoch": 3, "seq_len": 64, "state": state}
    assert zlib.decompress(payload) == json.dumps(body, separators=(",", ":")).encode()


def test_a_cursor_signed_with_another_secret_or_edited_is_refused() -> None:
    data = Cursor(FP, 0, 64, CachedState.model_validate(CACHED)).encode(b"k")
    assert "not made by this server" in refusal(data, b"other")
    assert "not made by this server" in refusal(data)
    assert "not made by this server" in refusal(data[:1] + bytes(TAG_BYTES) + data[1 + TAG_BYTES:], b"k")
    assert "another dataset configuration" in refusal(Cursor("f" * 16, 0, 64, None).encode())
    assert "unknown cursor version" in refusal(b"\x04" + data[1:])


def test_a_cursor_resumes_only_rows_of_its_length() -> None:
    message = refusal(Cursor(FP, 0, 128, CachedState.model_validate(CACHED)).encode(), seq_len=64)
    assert "rows of 128 tokens, this stream asks for 64" in message and "seq_len 128" in message


# A cursor made by the released server (version 1, unsigned: Cursor(FP, 0, 1, 3, state).encode() of
# git show 4b737af:server/cursor.py), and a version-2 body as the order before virtual ranks wrote it.
OLD_ORDER = {
    "released": bytes.fromhex(
        "0178da15ca4b0a80201446e1bdfc63079a3def6e4caf08458a0a0dc4bd67c3c3771a7c0241aa49cfcbbaed8739ad630f816c9e0b"
        "2405de986f0752029ca20d202d50aaa90c6a48b10c1ad769aa0dfc47ef1f097a1911"),
    "v2": bytes([2]) + bytes(TAG_BYTES) + zlib.compress(json.dumps(
        {"fp": FP, "rank": 0, "world": 1, "epoch": 3, "state": {"pos": 10, "batches": 1}}).encode()),
}


@pytest.mark.parametrize("kind", sorted(OLD_ORDER))
@pytest.mark.parametrize("secret", [b"", b"k"])
def test_a_cursor_of_the_order_before_virtual_ranks_is_refused_saying_why(kind: str, secret: bytes) -> None:
    message = refusal(OLD_ORDER[kind], secret)
    assert "order before virtual ranks" in message and "start the epoch without a cursor" in message


def body(**changes: Any) -> dict[str, Any]:
    return {"fp": FP, "epoch": 0, "seq_len": 64, "state": CACHED, **changes}


@pytest.mark.parametrize("forged", [
    body(state={"row": "abc", "virtual": 1}), body(state={}), body(state=[1, 2]), body(state={"row": 1}),
    body(state={"row": 1.5, "virtual": 1}), body(state={"row": -1e9, "virtual": 1}),
    body(state={"row": -1, "virtual": 1}), body(state={"row": 0, "virtual": 0}),
    body(state={**CACHED, "x": 1}), body(state={"pos": 0, "batches": 0}),
    body(epoch=-1), body(epoch=2**40), body(epoch="1"), body(seq_len=0), body(seq_len=True),
    body(state={**STREAMING, "offset": -1}), body(state={**STREAMING, "batches": 3}),
    body(state={**STREAMING, "at": {**STREAMING["at"], "start": {**STREAMING["at"]["start"], "exhausted": []}}}),
    {}, [1, 2], "text", None, {"fp": FP},
])
def test_a_signed_cursor_with_a_wrong_state_is_refused_in_plain_words(forged: Any) -> None:
    message = refusal(signed(forged))
    assert "holds no valid stream position" in message and "Error" not in message


@pytest.mark.parametrize("data", [b"", b"\x03", b"\x03" + bytes(TAG_BYTES) + b"not zlib",
                                  signed(body())[:-3], b"\x03" + bytes(TAG_BYTES) + zlib.compress(b"{" * 70000)])
def test_corrupt_truncated_or_oversized_cursors_are_refused(data: bytes) -> None:
    assert "cursor:" in refusal(data)
