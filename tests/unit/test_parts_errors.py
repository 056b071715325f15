"""Part sequences that do not form a response: a clear FeedError, and a call cut mid-sequence is a broken stream."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from sigil_feed.client import BatchStream, FeedError
from sigil_feed.client.parts import PartsCut, PartsError, read_response, whole
from sigil_feed.protos import feed_pb2
from tests.unit import test_client_stream
from tests.unit.test_client_stream import FakeFeed, expected, index_of
from tests.unit.test_parts import EPOCH_END, part, split

serve = test_client_stream.serve  # the fake-servicer fixture

Serve = Callable[..., tuple[str, grpc.Server]]


def test_parts_that_join_into_no_message_are_a_parts_error() -> None:
    raw = [part(b"\x0a\xff\xff"), part(b"\xff", last=True)]  # a length-delimited field whose length is cut
    with pytest.raises(PartsError, match=r"2 Part\(s\) of 4 bytes do not form a response"):
        list(whole(map(read_response, raw), None))


def test_a_call_that_ends_inside_a_part_sequence_is_cut_not_complete() -> None:
    batch = feed_pb2.StreamResponse(batch=feed_pb2.Batch(seq=4, cursor=b"c" * 500))
    joined = whole(map(read_response, [EPOCH_END.SerializeToString(), *split(batch, 64)[:-1]]), None)
    assert next(joined) == EPOCH_END
    with pytest.raises(PartsCut, match=r"ended after 7 Part\(s\) .* before the last"):
        next(joined)


class _EndOk(Exception):
    """Raised by _OkContext.abort: the servicer returns instead, so the call ends with status OK."""


class _OkContext:
    """A servicer context whose abort() ends the call normally (status OK) instead of with an error."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _EndOk

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class CutFeed(FakeFeed):
    """Ends the call with status OK right after the first Part of batch `fail_at` (once)."""

    def Stream(self, request_iterator: Iterator[feed_pb2.StreamRequest],
               context: grpc.ServicerContext) -> Iterator[feed_pb2.StreamResponse]:
        try:
            yield from super().Stream(request_iterator, _OkContext(context))  # type: ignore[arg-type]
        except _EndOk:
            return


class GarbledFeed(FakeFeed):
    """Sends batch `garbled` as two Parts whose bytes are no StreamResponse."""

    def __init__(self, garbled: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.garbled = garbled

    def _responses(self, batch: feed_pb2.Batch, parts: bool) -> list[feed_pb2.StreamResponse]:
        if batch.seq != self.garbled:
            return super()._responses(batch, parts)
        return [feed_pb2.StreamResponse(part=feed_pb2.Part(data=b"\x0a\xff\xff")),
                feed_pb2.StreamResponse(part=feed_pb2.Part(data=b"\xff", last=True))]


def test_a_stream_cut_inside_a_part_sequence_reconnects_and_resumes(serve: Serve,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Before: the call's OK status mid-Parts ended iteration after batch 6, as if training data were done."""
    fake = CutFeed(fail_at=7, part_bytes=16)
    target, _ = serve(fake)
    with caplog.at_level(logging.INFO), BatchStream(target, batch_size=1, prefetch=4) as stream:
        items = [index_of(item) for item in stream]
    assert items == expected(fake)
    assert [o.cursor for o in fake.opens] == [b"", b"7"]
    assert any("before the last Part" in r.getMessage() and "reconnecting" in r.getMessage()
               for r in caplog.records)


def test_parts_that_form_no_message_reach_the_loop_as_a_feed_error(serve: Serve) -> None:
    """Before: google.protobuf.message.DecodeError, which no handler of the client's errors catches."""
    target, _ = serve(GarbledFeed(garbled=3, part_bytes=16))
    seen: list[int | str] = []
    with BatchStream(target, batch_size=1, prefetch=2) as stream, \
            pytest.raises(FeedError, match=r"at 127\.0\.0\.1:\d+: .*do not form a response"):
        for item in stream:
            seen.append(index_of(item))
    assert seen == [0, 1, 2]
