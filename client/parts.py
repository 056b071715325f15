"""Responses that come in Parts: read each message without copying a Part's data, join a response's Parts.

A client that sets `Open.accept_parts` gets every response over 1 MiB as consecutive Part messages (see
protos/feed.proto). The server frames them exactly as protobuf would, so a Part's data is found by reading
its few header bytes and kept as a view into gRPC's message; the Parts of a response are joined with one copy
and parsed as the StreamResponse they carry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from ..protos import feed_pb2

_STREAM = "/{}/{}".format(*feed_pb2.DESCRIPTOR.services_by_name["DataFeed"].methods_by_name["Stream"]
                           .full_name.rsplit(".", 1))
_PART_TAG = bytes([feed_pb2.StreamResponse.DESCRIPTOR.fields_by_name["part"].number << 3 | 2])
_DATA_TAG = bytes([feed_pb2.Part.DESCRIPTOR.fields_by_name["data"].number << 3 | 2])
_LAST = feed_pb2.Part(last=True).SerializeToString()


class PartsError(ValueError):
    """The Parts received do not form a response."""


class PartsCut(PartsError):
    """The call ended, with status OK, inside a Part sequence: the response was cut off, as by a broken
    connection (the client reconnects and resumes at the last whole response)."""


@dataclass(frozen=True, slots=True)
class Part:
    """One Part: a view of its data inside the message gRPC received (no copy)."""

    data: memoryview
    last: bool


def stream_method(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """DataFeed.Stream on `channel`, yielding each Part as a Part and every other response parsed."""
    return channel.stream_stream(_STREAM, request_serializer=feed_pb2.StreamRequest.SerializeToString,
                                 response_deserializer=read_response)


def read_response(raw: bytes) -> feed_pb2.StreamResponse | Part:
    """One received message: a Part (its data a view into `raw`), or the StreamResponse it is."""
    part = _framed_part(raw)
    if part is not None:
        return part
    response = feed_pb2.StreamResponse.FromString(raw)
    if response.WhichOneof("kind") == "part":  # framed some other valid way
        return Part(memoryview(response.part.data), response.part.last)
    return response


def whole(messages: Iterable[feed_pb2.StreamResponse | Part], limit: int | None) -> Iterator[feed_pb2.StreamResponse]:
    """One call's responses with their Parts joined.

    PartsError past `limit` bytes, on a response inside a Part sequence, or when a sequence's joined bytes are
    no StreamResponse; PartsCut when the call ends (status OK) inside a sequence. A call that breaks (an RpcError)
    drops the Parts not completed with this iterator: a new call starts afresh, and the resume cursor, which
    moves per whole response, makes it send that response again whole.
    """
    pending: list[memoryview] = []
    size = 0
    for message in messages:
        if not isinstance(message, Part):
            if pending:
                raise PartsError(f"a {message.WhichOneof('kind')!r} response came before the last Part of the "
                                 "one being received")
            yield message
            continue
        pending.append(message.data)
        size += len(message.data)
        if limit is not None and size > limit:
            raise PartsError(f"a response sent in Parts exceeds {limit} bytes (grpc.max_receive_message_length)")
        if message.last:
            response = _parse_joined(pending, size)
            pending, size = [], 0
            yield response
    if pending:
        raise PartsCut(f"the call ended after {len(pending)} Part(s) ({size} bytes) of a response, before the "
                       "last Part")


def _parse_joined(pending: list[memoryview], size: int) -> feed_pb2.StreamResponse:
    """The StreamResponse that a complete Part sequence carries; PartsError if its bytes are none."""
    try:
        return feed_pb2.StreamResponse.FromString(b"".join(pending))
    except DecodeError as err:
        raise PartsError(f"the {len(pending)} Part(s) of {size} bytes do not form a response ({err})") from None


def _framed_part(raw: bytes) -> Part | None:
    """The Part in `raw` if it is framed as protobuf (and so the server) writes one with data; else None."""
    if not raw.startswith(_PART_TAG):
        return None
    length, at = _varint(raw, len(_PART_TAG))
    if at + length != len(raw) or raw[at:at + 1] != _DATA_TAG:
        return None
    size, start = _varint(raw, at + 1)
    end = start + size
    if end > len(raw) or raw[end:] not in (b"", _LAST):
        return None
    return Part(memoryview(raw)[start:end], end < len(raw))


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    """The base-128 varint at `at` and the offset after it (a cut varint reads short; callers check lengths)."""
    value = shift = 0
    for offset in range(at, min(at + 10, len(raw))):
        value |= (raw[offset] & 0x7F) << shift
        if raw[offset] < 0x80:
            return value, offset + 1
        shift += 7
    return -1, len(raw)
