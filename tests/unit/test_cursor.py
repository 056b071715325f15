"""Cursors: round trip, signature, and the schema every decoded state must match."""

from __future__ import annotations

import hashlib
import hmac
import json
import zlib
from typing import Any

import grpc
import pytest

from sigil_feed.server.cursor import TAG_BYTES, VERSION, Cursor, decode_cursor
from sigil_feed.server.errors import RequestError

FP = "0123456789abcdef"
STREAMING = {"at": {"block": 0, "start": {"turn": 0, "exhausted": [False], "done": False,
                                          "children": [{"at": {"file": 0, "row": 3, "offset": 120}, "skip": 0}]},
                    "taken": 2}, "offset": 5, "batches": 7, "wraps": 0}


def signed(body: Any, secret: bytes = b"") -> bytes:
    """A cursor holding any JSON body, signed as the server signs (see server/cursor.py)."""
    payload = zlib.compress(json.dumps(body).encode())
    tag = hmac.new(secret, bytes([VERSION]) + payload, hashlib.sha256).digest()[:TAG_BYTES]
    return bytes([VERSION]) + tag + payload


def refusal(data: bytes, secret: bytes = b"") -> str:
    with pytest.raises(RequestError) as err:
        decode_cursor(data, fingerprint=FP, rank=0, world_size=1, secret=secret)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    return str(err.value)


@pytest.mark.parametrize("state", [None, {"pos": 10, "batches": 1}, STREAMING])
def test_a_cursor_round_trips_with_its_secret(state: Any) -> None:
    data = Cursor(FP, 0, 1, 3, state).encode(b"k")
    assert decode_cursor(data, fingerprint=FP, rank=0, world_size=1, secret=b"k") == Cursor(FP, 0, 1, 3, state)


def test_a_cursor_signed_with_another_secret_or_edited_is_refused() -> None:
    data = Cursor(FP, 0, 1, 0, {"pos": 10, "batches": 1}).encode(b"k")
    assert "not made by this server" in refusal(data, b"other")
    assert "not made by this server" in refusal(data)
    assert "not made by this server" in refusal(data[:1] + bytes(TAG_BYTES) + data[1 + TAG_BYTES:], b"k")
    assert "another dataset configuration" in refusal(Cursor("f" * 16, 0, 1, 0, None).encode())
    assert "rank 1 of 2" in refusal(Cursor(FP, 1, 2, 0, None).encode())
    assert "unknown cursor version" in refusal(b"\x03" + data[1:])


# Cursors made by the released server (version 1, unsigned), by its own encoder (git show 4b737af:server/cursor.py):
# Cursor(FP, 0, 1, 3, state).encode() for a cached and a streaming state.
RELEASED = {
    "cached": bytes.fromhex(
        "0178da15ca4b0a80201446e1bdfc63079a3def6e4caf08458a0a0dc4bd67c3c3771a7c0241aa49cfcbbaed8739ad630f816c9e0b"
        "2405de986f0752029ca20d202d50aaa90c6a48b10c1ad769aa0dfc47ef1f097a1911"),
    "streaming": bytes.fromhex(
        "0178da454e490e83300cfccb9c736029a5cd57500f263802111194045109f1f79a54552f963d9be7805da15194557d6beeede349bd"
        "19d84221d03243170abb0f6e802e1578f56684ae1562a2c4d007285db377de7cc542840ca52d2c19e1f7485b4c2c119d2517f9a530"
        "f845dcf95230e3e486c0a2ee7e7976729ccdc1eff99fb736b25065559cf2649ea47471be644f345fd6eafc8b1a859e92193942b7d2"
        "3fd01a2ff9f901b5b449e6"),
}


@pytest.mark.parametrize(("kind", "state"), [("cached", {"pos": 10, "batches": 1}), ("streaming", STREAMING)])
def test_a_released_servers_unsigned_cursor_resumes_where_no_secret_is_set(kind: str, state: Any) -> None:
    decoded = decode_cursor(RELEASED[kind], fingerprint=FP, rank=0, world_size=1)
    assert decoded == Cursor(FP, 0, 1, 3, state)


def test_a_released_servers_unsigned_cursor_is_refused_under_a_secret() -> None:
    message = refusal(RELEASED["cached"], b"k")
    assert "unsigned cursor from an older server; the server has a cursor secret configured" in message


def unsigned(body: Any) -> bytes:
    """A version-1 cursor holding any JSON body."""
    return bytes([1]) + zlib.compress(json.dumps(body).encode())


def test_an_unsigned_cursor_goes_through_the_same_checks() -> None:
    assert "another dataset configuration" in refusal(unsigned(body(fp="f" * 16)))
    assert "rank 1 of 2" in refusal(unsigned(body(rank=1, world=2)))
    assert "holds no valid stream position" in refusal(unsigned(body(state={"pos": -1, "batches": 0})))
    assert "not a sigil-feed cursor" in refusal(RELEASED["cached"][:-3])


def body(**changes: Any) -> dict[str, Any]:
    return {"fp": FP, "rank": 0, "world": 1, "epoch": 0, "state": {"pos": 0, "batches": 0}, **changes}


@pytest.mark.parametrize("forged", [
    body(state={"pos": "abc", "batches": 0}), body(state={}), body(state=[1, 2]), body(state={"pos": 1}),
    body(state={"pos": 1.5, "batches": 0}), body(state={"pos": 0, "batches": -1e9}),
    body(state={"pos": 0, "batches": -1}), body(state={"pos": 0, "batches": 0, "x": 1}),
    body(epoch=-1), body(epoch=2**40), body(epoch="1"), body(rank=True), body(world=0),
    body(state={**STREAMING, "offset": -1}),
    body(state={**STREAMING, "at": {**STREAMING["at"], "start": {**STREAMING["at"]["start"], "exhausted": []}}}),
    {}, [1, 2], "text", None, {"fp": FP},
])
def test_a_signed_cursor_with_a_wrong_state_is_refused_in_plain_words(forged: Any) -> None:
    message = refusal(signed(forged))
    assert "holds no valid stream position" in message and "Error" not in message


@pytest.mark.parametrize("data", [b"", b"\x02", b"\x02" + bytes(TAG_BYTES) + b"not zlib",
                                  signed(body())[:-3], b"\x02" + bytes(TAG_BYTES) + zlib.compress(b"{" * 70000)])
def test_corrupt_truncated_or_oversized_cursors_are_refused(data: bytes) -> None:
    assert "cursor:" in refusal(data)
