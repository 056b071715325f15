"""Turns sigil-feed's exceptions into gRPC status codes, in this one place."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from .errors import RequestError, SourceError

log = logging.getLogger(__name__)

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _status_of(err: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, RequestError):
        return err.code, str(err)
    if isinstance(err, SourceError):
        return grpc.StatusCode.DATA_LOSS, str(err)
    log.exception("internal error", exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}"


def _guard(behaviour: Handler) -> Handler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as err:  # the one place that maps every failure to a status
            code, message = _status_of(err)
            await context.abort(code, message)

    return guarded


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps DataFeed's handlers so errors become a status and a message, never a crash."""

    SERVICE_PREFIX = "/sigil_feed.v1.DataFeed/"

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.SERVICE_PREFIX):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard(handler.unary_unary))
        return handler._replace(stream_stream=_guard(handler.stream_stream))
