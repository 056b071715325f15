"""Streams that hold credit but never read (their writes stalled by HTTP/2 flow control) cannot lock others out:
issue 22, item 5. One wedged trainer process in a pod holds streams from the address every rank connects from."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from sigil_feed.client.stream import BatchStream, FeedBatch, FeedServerError
from tests.integration.conftest import feed_config, open_request
from tests.integration.test_lifecycle import BIG, RawStream, clients, wait_for

WEDGED = 4
LIMITS = {"max_streams": 8, "max_streams_per_peer": WEDGED, "max_seq_len": 4096, "max_credits": 64,
          "idle_timeout_s": 60}


def wedge(channel: grpc.Channel) -> list[RawStream]:
    """WEDGED streams from this address that Open with every credit they may grant, then never read; returns
    once the server has filled their flow-control windows and waits on their writes."""
    wedged = [RawStream(channel, open_request(credits=64, client_id=f"wedged-{i}", **BIG)) for i in range(WEDGED)]
    assert wait_for(lambda: len(clients(channel)) == WEDGED)
    sent = lambda: sorted(c.batches for c in clients(channel))  # noqa: E731
    last: list[int] = []
    while sent() != last:  # until no stream makes progress
        last = sent()
        time.sleep(0.5)
    assert all(b < 64 for b in last), last  # stalled with credit left, not out of credit
    return wedged


def first_batch_s(target: str, deadline_s: float) -> float:
    """Seconds until a well-behaved client from the same address holds a batch, retrying while refused."""
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        try:
            with BatchStream(target, batch_size=2, prefetch=2, client_id="good") as stream:
                if any(isinstance(item, FeedBatch) for item in stream):
                    return time.monotonic() - start
        except FeedServerError as err:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            time.sleep(0.2)
    raise AssertionError(f"a well-behaved client was refused for {deadline_s} s")


def test_streams_that_never_read_are_ended_after_the_write_timeout(tmp_path: Path, start_server) -> None:
    server = start_server(feed_config(tmp_path, {"limits": {**LIMITS, "write_timeout_s": 2, "evict_stalled_s": 60}},
                                      pairs=300, pack=False))
    with grpc.insecure_channel(server.target) as channel:
        wedged = wedge(channel)
        waited = first_batch_s(server.target, deadline_s=30)
        print(f"a well-behaved client was served {waited:.1f} s after {WEDGED} streams stalled on their writes")
        assert waited < 2 + 6  # the write timeout, and slack for a busy machine
        for stream in wedged:  # each reads what was buffered, then its status
            _, code, details = stream.read_all()
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
            assert "the client read nothing for 2 s (server.limits.write_timeout_s)" in details
            assert "resume from the last cursor" in details


def test_a_new_stream_takes_the_place_of_the_one_stalled_longest(tmp_path: Path, start_server) -> None:
    server = start_server(feed_config(tmp_path, {"limits": {**LIMITS, "write_timeout_s": 600, "evict_stalled_s": 1}},
                                      pairs=300, pack=False))
    with grpc.insecure_channel(server.target) as channel:
        wedged = wedge(channel)
        time.sleep(1)  # stalled for longer than evict_stalled_s
        with BatchStream(server.target, batch_size=2, prefetch=2, client_id="good") as stream:
            assert any(isinstance(item, FeedBatch) for item in stream)  # admitted at once, never refused
            ids = {c.client_id for c in clients(channel)}
        gone = [i for i in range(WEDGED) if f"wedged-{i}" not in ids]
        assert "good" in ids and len(gone) == 1, ids  # exactly one wedged stream made room
        _, code, details = wedged[gone[0]].read_all()
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "while the server was full (server.limits.evict_stalled_s)" in details
        for stream in wedged:
            stream.call.cancel()
