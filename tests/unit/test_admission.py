"""Admission places: a write that does not complete ends its stream, and a full server evicts the stream stalled
on a write the longest (issue 22, item 5)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from sigil_feed.server.config import Limits
from sigil_feed.server.errors import Exhausted, FeedError
from sigil_feed.server.rpc.admission import Admission, LoopShare
from sigil_feed.server.rpc.interceptor import status_of


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_a_write_that_does_not_complete_within_the_timeout_ends_the_stream_unavailable() -> None:
    async def scenario() -> None:
        admission = Admission(Limits(write_timeout_s=0.2))
        with admission.slot("ipv4:127.0.0.1:1") as place:
            await place.write(asyncio.sleep(0.01))  # a write that completes leaves nothing behind
            assert place.stalled_since is None
            never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            with pytest.raises(FeedError, match=r"read nothing for 0.2 s \(server.limits.write_timeout_s\)") as err:
                await place.write(never)
            assert status_of(err.value)[0] == grpc.StatusCode.UNAVAILABLE
            assert never.cancelled()
        assert admission.total == 0 and not admission.by_host

    run(scenario())


def test_a_cancel_from_elsewhere_is_not_taken_for_a_timeout() -> None:
    async def scenario() -> None:
        with Admission(Limits()).slot("ipv4:127.0.0.1:1") as place:
            never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(place.write(never))
            await asyncio.sleep(0.01)
            task.cancel()  # the client cancelled the call
            with pytest.raises(asyncio.CancelledError):
                await task

    run(scenario())


def test_a_full_server_evicts_the_stream_stalled_longest_and_only_past_evict_stalled_s() -> None:
    async def scenario() -> None:
        admission = Admission(Limits(max_streams=3, max_streams_per_peer=2, evict_stalled_s=0.5))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        slots = [admission.slot(peer) for peer in ["ipv4:10.0.0.1:1", "ipv4:10.0.0.1:2", "ipv4:10.0.0.2:1"]]
        places, writes = [], []
        for i, slot in enumerate(slots):
            places.append(slot.__enter__())
            writes.append(asyncio.ensure_future(places[i].write(futures[i])))
            await asyncio.sleep(0.01)
        with pytest.raises(Exhausted, match="3 streams already open"):  # stalled, but not for long enough
            admission.slot("ipv4:10.0.0.3:1").__enter__()
        await asyncio.sleep(0.6)
        with admission.slot("ipv4:10.0.0.2:9"):  # the server is full: any address's longest stall makes room
            assert places[0].released and not places[1].released
            with pytest.raises(FeedError, match=r"read nothing for 0.\d s while the server was full"):
                await writes[0]
            with admission.slot("ipv4:10.0.0.1:3"):  # its address is full: one of its own makes room
                assert places[1].released and not places[2].released
                assert admission.total == 3 and admission.by_host == {"10.0.0.1": 1, "10.0.0.2": 2}
        for write in writes[2:]:
            write.cancel()

    run(scenario())


def test_long_writes_take_at_most_their_share_of_the_loop_while_other_streams_are_open() -> None:
    async def scenario(crowded: bool) -> float:
        share = LoopShare(0.25)

        async def sending() -> None:  # gRPC's copy of a whole big message: holds the loop 20 ms
            time.sleep(0.02)

        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(5):
            await share.write(sending, lambda: crowded)
        return loop.time() - began

    alone, beside_others = run(scenario(False)), run(scenario(True))
    assert alone < 0.2, alone  # a client alone is not paced
    assert beside_others >= 4 * 0.02 / 0.25, beside_others  # each write waits until the last one's cost is 25%
