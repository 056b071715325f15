"""The client's reading of Parts: views without a copy, any valid framing, and joins that refuse bad sequences."""

from __future__ import annotations

import pytest

from sigil_feed.client.parts import Part, PartsError, read_response, whole
from sigil_feed.protos import feed_pb2

EPOCH_END = feed_pb2.StreamResponse(epoch_end=feed_pb2.EpochEnd(epoch=2, cursor=b"next"))


def part(data: bytes, last: bool = False) -> bytes:
    return feed_pb2.StreamResponse(part=feed_pb2.Part(data=data, last=last)).SerializeToString()


def split(response: feed_pb2.StreamResponse, size: int) -> list[bytes]:
    """The response as Parts of `size` bytes, framed by protobuf."""
    data = response.SerializeToString()
    return [part(data[i:i + size], i + size >= len(data)) for i in range(0, len(data), size)]


@pytest.mark.parametrize(("data", "last"), [(b"x", False), (b"abc" * 300, True), (bytes(200), False)])
def test_a_part_is_read_as_a_view_into_the_message(data: bytes, last: bool) -> None:
    raw = part(data, last)
    read = read_response(raw)
    assert isinstance(read, Part) and (bytes(read.data), read.last) == (data, last)
    assert read.data.obj is raw  # no copy of the data


@pytest.mark.parametrize("raw", [part(b"", last=True),  # protobuf leaves empty data out
                                 bytes([0x22, 0x05, 0x10, 0x01, 0x0A, 0x01]) + b"z",  # last before data
                                 part(b"ab") + bytes([0x22, 0x02, 0x10, 0x01])])  # the part field twice: merged
def test_a_part_framed_any_valid_way_is_read_as_protobuf_reads_it(raw: bytes) -> None:
    read = read_response(raw)
    expected = feed_pb2.StreamResponse.FromString(raw).part
    assert isinstance(read, Part) and (bytes(read.data), read.last) == (expected.data, expected.last)


def test_other_responses_are_parsed() -> None:
    assert read_response(EPOCH_END.SerializeToString()) == EPOCH_END


def test_parts_join_into_their_response_between_whole_ones() -> None:
    batch = feed_pb2.StreamResponse(batch=feed_pb2.Batch(seq=4, cursor=b"c" * 500, tokens=9))
    raw = [EPOCH_END.SerializeToString(), *split(batch, 64), EPOCH_END.SerializeToString(), *split(batch, 1000)]
    assert list(whole(map(read_response, raw), None)) == [EPOCH_END, batch, EPOCH_END, batch]


def test_a_response_inside_a_part_sequence_is_refused() -> None:
    batch = feed_pb2.StreamResponse(batch=feed_pb2.Batch(cursor=b"c" * 500))
    with pytest.raises(PartsError, match="'epoch_end' response came before the last Part"):
        list(whole(map(read_response, [split(batch, 64)[0], EPOCH_END.SerializeToString()]), None))


def test_parts_beyond_the_receive_limit_are_refused() -> None:
    batch = feed_pb2.StreamResponse(batch=feed_pb2.Batch(cursor=b"c" * 500))
    with pytest.raises(PartsError, match="exceeds 400 bytes"):
        list(whole(map(read_response, split(batch, 64)), 400))
    assert len(list(whole(map(read_response, split(batch, 64)), 600))) == 1
