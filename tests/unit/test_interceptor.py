"""The error interceptor's mapping of failures to status codes, one RPC at a time."""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

import grpc
import pytest
from grpc._cython import cygrpc

from sigil_feed.server.errors import (
    Exhausted,
    NotFound,
    Refused,
    RequestError,
    SourceError,
    TimedOut,
    Unavailable,
)
from sigil_feed.server.rpc.interceptor import _guard


class Context:
    """The few ServicerContext calls the interceptor makes, recorded, with the statuses reported by then."""

    def __init__(self, statuses: list[grpc.StatusCode]) -> None:
        self.statuses = statuses
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.reported_before_abort: list[grpc.StatusCode] = []

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        self.reported_before_abort = list(self.statuses)
        raise grpc.aio.AbortError("aborted")

    def code(self) -> grpc.StatusCode | None:
        return self.aborted[0] if self.aborted else None


def outcome(error: BaseException) -> tuple[type[BaseException], grpc.StatusCode, Context]:
    """The exception the guarded handler ends with, the status it reported and the context."""
    statuses: list[grpc.StatusCode] = []

    async def behaviour(request: Any, context: Any) -> None:
        raise error

    context = Context(statuses)
    guarded = _guard(behaviour, None, False, "/m", lambda method, code: statuses.append(code))
    with pytest.raises(BaseException) as raised:
        asyncio.run(guarded(b"", context))  # type: ignore[arg-type]
    assert len(statuses) == 1, statuses
    return raised.type, statuses[0], context


def test_a_write_failing_because_the_client_left_is_cancelled_not_internal() -> None:
    # gRPC core fails a write when the client cancelled under it, before it cancels the handler
    kind, code, context = outcome(cygrpc.ExecuteBatchError('Failed "execute_batch"'))
    assert (kind, code, context.aborted) == (asyncio.CancelledError, grpc.StatusCode.CANCELLED, None)


@pytest.mark.parametrize(("error", "code"), [
    (NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (Refused("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (Exhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimedOut("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (SourceError("x"), grpc.StatusCode.DATA_LOSS),
    (ValueError("boom"), grpc.StatusCode.INTERNAL),
])
def test_other_failures_are_sent_as_their_status(error: Exception, code: grpc.StatusCode) -> None:
    kind, reported, context = outcome(error)
    assert kind is grpc.aio.AbortError and reported == code and context.aborted is not None
    assert context.aborted[0] == code
    assert context.reported_before_abort == [code]  # counted before the client can see it and scrape /metrics


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), ConnectionResetError("reset by peer"),
                                   FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")])
def test_an_unforeseen_io_error_is_unavailable_never_internal(error: OSError,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Last resort: the client reconnects and resumes from its cursor; the log keeps the traceback."""
    with caplog.at_level(logging.ERROR, logger="sigil_feed.server.rpc.interceptor"):
        kind, reported, context = outcome(error)
    assert kind is grpc.aio.AbortError and reported == grpc.StatusCode.UNAVAILABLE
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, f"I/O error: {type(error).__name__}: {error}")
    assert caplog.records[-1].exc_info is not None and caplog.records[-1].exc_info[1] is error
