"""Credits: the per-stream flow-control ledger, its limits, its lag and its shutdown drain."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from sigil_feed.server.errors import FeedError
from sigil_feed.server.rpc.credits import Credits
from sigil_feed.server.rpc.interceptor import status_of


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_each_credit_allows_one_batch_and_closing_ends_the_stream() -> None:
    async def scenario() -> list[bool]:
        credits = Credits(2, limit=4)
        taken = [await credits.take(), await credits.take()]
        await credits.close()
        return [*taken, await credits.take()]

    assert run(scenario()) == [True, True, False]


@pytest.mark.parametrize(("grant", "message"), [(0, "credit.credits: must be >= 1"), (3, "more than 4 batches")])
def test_zero_or_too_many_credits_fail_the_stream(grant: int, message: str) -> None:
    async def scenario() -> int:
        credits = Credits(2, limit=4)
        await credits.add(grant)
        with pytest.raises(FeedError, match=message) as err:
            await credits.take()
        assert status_of(err.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
        return credits.available

    assert run(scenario()) == 2  # a refused grant is not added


def test_lag_is_the_age_of_the_oldest_unanswered_credit() -> None:
    async def scenario() -> tuple[float, float, float]:
        credits = Credits(1, limit=4)
        await asyncio.sleep(0.05)
        await credits.add(1)
        first = credits.lag_s()
        await credits.take()  # answers the oldest grant
        second = credits.lag_s()
        await credits.take()
        return first, second, credits.lag_s()

    first, second, none = run(scenario())
    assert first >= 0.05 > second and none == 0.0


def test_draining_serves_what_was_granted_then_is_unavailable() -> None:
    async def scenario() -> tuple[list[bool], FeedError, float]:
        credits = Credits(2, limit=4)
        await credits.drain()
        await credits.add(2)  # granted after shutdown began: ignored
        taken = [await credits.take(), await credits.take()]
        started = time.monotonic()
        with pytest.raises(FeedError) as err:
            await credits.take()
        return taken, err.value, time.monotonic() - started

    taken, error, waited = run(scenario())
    assert taken == [True, True] and status_of(error)[0] == grpc.StatusCode.UNAVAILABLE and waited < 0.5


def test_drain_wakes_a_stream_waiting_for_credits() -> None:
    async def scenario() -> grpc.StatusCode:
        credits = Credits(0, limit=4)
        waiting = asyncio.create_task(credits.take())
        await asyncio.sleep(0.01)
        await credits.drain()
        with pytest.raises(FeedError) as err:
            await waiting
        return status_of(err.value)[0]

    assert run(scenario()) == grpc.StatusCode.UNAVAILABLE
