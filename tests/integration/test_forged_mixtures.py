"""A client without the cursor secret can compute a cursor's tag (README, Security), so the mixtures a cursor carries
are untrusted input: weights that are infinite, overflow their sum, or copy each sample without bound, and a position
past any integer a layout holds, or (cached mode) a source so rarely drawn that the layout would never end, are
refused
FAILED_PRECONDITION in plain words, at once, in both modes, and the server goes on serving."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.client.position import decode_cursor
from sigil_feed.protos import feed_pb2_grpc
from sigil_feed.server.feed.cursor import TAG_BYTES
from tests.conftest import rust_pair, write_config, write_jsonl
from tests.integration.conftest import open_request, stream_status
from tests.unit.test_cursor import signed

SOURCES = ["local:a.jsonl", "local:b.jsonl"]


def forged(cursor: bytes, then: dict[str, Any] | None = None, **mix: Any) -> bytes:
    """The cursor with its epoch plan's last mixture changed (and `then` appended to the plan), signed as a client
    without the secret can."""
    body = json.loads(zlib.decompress(cursor[1 + TAG_BYTES:]))
    body["mix"][-1] = {**body["mix"][-1], **mix}
    body["mix"] += [{**body["mix"][-1], **then}] if then else []
    return signed(body)


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "cached"])
def test_forged_mixture_weights_are_refused_and_the_server_keeps_serving(tmp_path: Path, start_server,
                                                                         cached: bool) -> None:
    write_jsonl(tmp_path / "a.jsonl", [rust_pair(i, task="explain") for i in range(60)])
    write_jsonl(tmp_path / "b.jsonl", [rust_pair(i) for i in range(60, 120)])
    server = start_server(write_config(tmp_path / "trainer.yaml", {
        "names": SOURCES, "use_cache": cached, "cache_dir": str(tmp_path / "cache"), "shuffle_seed": 1,
        "shuffle_block": 16, "interleave_mode": "weighted", "stopping_strategy": "all_exhausted",
        "dataset_weights": {SOURCES[0]: 2.0, SOURCES[1]: 1.0}, "task_weights": {"explain": 1.5}},
        max_seq_len=64))
    ds = FeedDataset(server.target, batch_size=2, seq_len=64)
    batches = iter(ds)
    next(batches)
    cursor = decode_cursor(ds.state_dict()["cursor"])
    assert json.loads(zlib.decompress(cursor[1 + TAG_BYTES:]))["mix"]  # a mid-epoch cursor carries its plan
    bad = [forged(cursor, w=[float("inf"), 1.0]), forged(cursor, w=[1e308, 1e308]),
           forged(cursor, t={"explain": float("inf")}), forged(cursor, t={"explain": 1e12}),
           forged(cursor, then={"w": [1.0, 3.0], "at": 2**70})]
    if cached:  # all_exhausted waiting for a source drawn with p = 1e-300: the layout would be drawn for ever
        bad.append(forged(cursor, w=[1e-300, 1.0]))
    with grpc.insecure_channel(server.target) as channel:
        stub = feed_pb2_grpc.DataFeedStub(channel)
        for data in bad:
            code, details, _ = stream_status(stub, [open_request(batch_size=2, seq_len=64, credits=2, cursor=data)],
                                             timeout=30)
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
            assert details.startswith("cursor: ") or "use stopping_strategy: first_exhausted" in details, details
        code, _, responses = stream_status(stub, [open_request(batch_size=2, seq_len=64, credits=2, cursor=cursor)])
    assert sum(r.HasField("batch") for r in responses) == 2  # the real cursor still resumes
