"""The few exception types of the server; each maps to an exit code or a gRPC status in one place."""

from __future__ import annotations

import grpc


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
    """A source cannot be opened or read (missing path, unreadable file, strict bad record)."""


class RequestError(FeedError):
    """A client request the server refuses, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(field: str, message: str) -> RequestError:
    """An INVALID_ARGUMENT error that names the offending request field."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}")
