"""The JSONL line parser (orjson first on short lines, json.loads where orjson refuses) gives what json.loads
gave alone: the same values, and the same lines fail (deep nesting included)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigil_feed.server.pipeline.sources.jsonl import loads

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


def outcome(parse: Any, line: bytes) -> Any:
    """The parsed value, or the kind of error (both count as malformed in JsonlSource)."""
    try:
        return ("ok", parse(line))
    except (ValueError, RecursionError) as err:
        return ("error", type(err).__name__ in ("RecursionError",))


def reference(line: bytes) -> Any:
    return json.loads(line.decode())


@given(JSON, st.booleans())
def test_valid_lines_parse_to_the_same_value(value: Any, ascii_only: bool) -> None:
    line = json.dumps(value, ensure_ascii=ascii_only).encode() + b"\n"
    assert outcome(loads, line) == outcome(reference, line)


@given(JSON, st.binary(max_size=3), st.integers(0, 1200))
def test_damaged_lines_fail_or_parse_alike(value: Any, junk: bytes, at: int) -> None:
    line = json.dumps({"text": value}).encode()
    line = line[:at] + junk + line[at:]
    assert outcome(loads, line) == outcome(reference, line)


@pytest.mark.parametrize("line", [
    b'{"text": "\\ud800"}',  # a lone surrogate: orjson refuses, json.loads accepts
    b'{"text": NaN}', b'{"text": 1e400}', b"\xef\xbb\xbf{}", b'{"text": "\xff"}', b'{"text": "x\x00"}',
    b"[" * 5000 + b"]" * 5000, b'{"text": "x", "meta": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # too deep for json
])
def test_what_orjson_refuses_falls_back_to_json(line: bytes) -> None:
    assert outcome(loads, line) == outcome(reference, line)
