"""Turns sigil-feed's exceptions (and undecodable requests) into gRPC status codes, in this one place."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ..errors import Exhausted, NotFound, Refused, RequestError, SourceError, TimedOut, Unavailable, invalid

log = logging.getLogger(__name__)

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Parse = Callable[[bytes], Any]
StatusSink = Callable[[str, grpc.StatusCode], None]


STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Refused, grpc.StatusCode.FAILED_PRECONDITION),
    (Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (SourceError, grpc.StatusCode.DATA_LOSS),
)
"""sigil-feed's exception types and the status each is answered with (subclasses before their base)."""


def status_of(err: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed RPC answers with: UNAVAILABLE for an I/O error no layer below foresaw (the
    client resumes from its cursor), INTERNAL for a bug; both logged with their traceback."""
    for kind, code in STATUS_OF:
        if isinstance(err, kind):
            return code, str(err)
    if isinstance(err, OSError):
        log.error("unforeseen I/O error, answered UNAVAILABLE", exc_info=err)
        return grpc.StatusCode.UNAVAILABLE, f"I/O error: {type(err).__name__}: {err}"
    log.exception("internal error", exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


def _parse(parse: Parse | None, raw: bytes) -> Any:
    """A request message from its bytes; INVALID_ARGUMENT when they are not one."""
    if parse is None:
        return raw
    try:
        return parse(raw)
    except DecodeError:
        raise invalid("request", "not a valid protobuf message of this method's request type") from None


async def _parse_each(parse: Parse | None, raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    async for message in raw:
        yield _parse(parse, message)


def _guard(behaviour: Handler, parse: Parse | None, streaming: bool, method: str, sink: StatusSink) -> Handler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Each way out reports its status before gRPC sends it, so a client that has seen the status and then
        # scrapes /metrics finds it counted.
        try:
            parsed = _parse_each(parse, request) if streaming else _parse(parse, request)
            result = await behaviour(parsed, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            sink(method, context.code() or grpc.StatusCode.UNKNOWN)
            raise
        except asyncio.CancelledError:
            sink(method, grpc.StatusCode.CANCELLED)
            raise
        except grpc.aio.InternalError:
            # gRPC core failed a read or write of this call: the client cancelled or vanished while it was under
            # way, before gRPC cancelled this handler. Nothing reaches the client any more: end as gRPC does for
            # a cancel (the service logs the closed stream), not as an internal error.
            sink(method, grpc.StatusCode.CANCELLED)
            log.debug("%s: the call was cancelled under an operation", method)
            raise asyncio.CancelledError from None
        except Exception as err:  # the one place that maps every failure to a status
            code, message = status_of(err)
            sink(method, code)
            await context.abort(code, message)
        sink(method, grpc.StatusCode.OK)
        return result

    return guarded


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """The handler's serializer, except that a response already encoded (bytes, see wire.py) goes out as is."""
    def serialized(response: Any) -> bytes:
        if isinstance(response, bytes) or serialize is None:
            return response  # type: ignore[no-any-return]
        return serialize(response)

    return serialized


def _ignore(method: str, code: grpc.StatusCode) -> None:
    """Default status sink: count nothing."""


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every coroutine handler: decodes requests, maps errors to a status, reports each RPC's status,
    and sends responses the handler encoded itself (bytes) unchanged."""

    def __init__(self, on_status: StatusSink = _ignore) -> None:
        self.on_status = on_status

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                    if getattr(handler, k) is not None)
        behaviour = getattr(handler, kind)
        if not inspect.iscoroutinefunction(behaviour):
            return handler  # async-generator handlers (reflection) keep gRPC's own handling
        guarded = _guard(behaviour, handler.request_deserializer, handler.request_streaming,
                         handler_call_details.method, self.on_status)
        return handler._replace(request_deserializer=None,
                                response_serializer=_passing_bytes(handler.response_serializer), **{kind: guarded})
