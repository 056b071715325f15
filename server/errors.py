"""The few exception types of the server; each maps to an exit code (cli/) or a gRPC status (rpc/interceptor.py)
in one place, so nothing below rpc/ knows about gRPC."""

from __future__ import annotations


class FeedError(Exception):
    """Base class of every error sigil-feed raises on purpose."""


class ConfigError(FeedError):
    """The configuration is invalid: names the key, the file and the fix. Exit code 2."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None,
                 fix: str | None = None) -> None:
        parts = [f"{file}: " if file else "", f"{key}: " if key else "", message]
        if fix:
            parts.append(f" (fix: {fix})")
        super().__init__("".join(parts))
        self.key, self.file, self.fix = key, file, fix


class SourceError(FeedError):
    """A source or stored data cannot be read as it should (missing path, unreadable file, strict bad record,
    a damaged shard): DATA_LOSS."""


class Unavailable(FeedError):
    """Serving cannot go on now but may later (shutdown, an idle stream closed, a store not built yet, storage
    that does not answer): the client reconnects and resumes. UNAVAILABLE."""


class RequestError(FeedError):
    """A client request the server refuses because the request is wrong: INVALID_ARGUMENT."""


class NotFound(RequestError):
    """The request names something the server does not define: NOT_FOUND."""


class Refused(RequestError):
    """The request is well formed but cannot be served as asked (a cursor of another configuration, a dataset
    that can never serve): FAILED_PRECONDITION."""


class Exhausted(RequestError):
    """A configured limit on concurrent streams is reached: RESOURCE_EXHAUSTED."""


class TimedOut(RequestError):
    """The client did not send what the server waits for in time: DEADLINE_EXCEEDED."""


def invalid(field: str, message: str) -> RequestError:
    """An INVALID_ARGUMENT error that names the offending request field."""
    return RequestError(f"{field}: {message}")
