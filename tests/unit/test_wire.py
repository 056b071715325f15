"""The hand-framed batch response and its Parts are byte for byte what protobuf would encode, and decode back."""

from __future__ import annotations

import numpy as np
import pytest

from sigil_feed.client.decode import decode_batch
from sigil_feed.client.parts import Part, read_response, whole
from sigil_feed.protos import feed_pb2
from sigil_feed.server.rows.batch import Rows
from sigil_feed.server.rpc.wire import CHUNK, PARTS_OVER, batch_response, ids_dtype, join, messages


def protobuf_encoded(rows: Rows, *, seq: int, epoch: int, cursor: bytes, row: int, vocab_size: int) -> bytes:
    """The same response built and serialized by the generated protobuf classes."""
    def tensor(name: str, array: np.ndarray) -> feed_pb2.Tensor:
        return feed_pb2.Tensor(name=name, dtype=array.dtype.str, shape=list(array.shape), data=array.tobytes())

    tensors = [tensor("input_ids", rows.input_ids.astype(ids_dtype(vocab_size)))]
    if rows.row_segments is None:
        tensors.append(tensor("lengths", rows.lengths))
    else:
        tensors += [tensor("segment_lengths", rows.lengths), tensor("row_segments", rows.row_segments)]
    if rows.loss_mask is not None:
        tensors.append(tensor("loss_mask", rows.loss_mask))
    batch = feed_pb2.Batch(seq=seq, epoch=epoch, tensors=tensors, cursor=cursor, tokens=rows.tokens, row=row)
    return feed_pb2.StreamResponse(batch=batch).SerializeToString()


def packed(rows: int, seq_len: int, mask: bool) -> Rows:
    rng = np.random.default_rng(rows * seq_len)
    ids = rng.integers(0, 8192, (rows, seq_len)).astype(np.int32)
    lengths = np.array([seq_len // 2, seq_len - seq_len // 2] * rows, dtype=np.int32)
    loss_mask = (rng.random((rows, seq_len)) > 0.5).astype(np.uint8) if mask else None
    return Rows(ids, lengths, np.full(rows, 2, dtype=np.int32), loss_mask, rows * seq_len)


def padded(rows: int, seq_len: int) -> Rows:
    ids = np.arange(rows * seq_len, dtype=np.uint16).reshape(rows, seq_len)
    return Rows(ids, np.full(rows, seq_len, dtype=np.int32), None, None, rows * seq_len)


@pytest.mark.parametrize("rows", [packed(16, 4096, False), packed(64, 16384, True), packed(3, 7, True),
                                  padded(2, 5), padded(1, 1),
                                  Rows(np.zeros((0, 4), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                                       None, 0)])
@pytest.mark.parametrize(("seq", "epoch", "cursor", "vocab"), [(0, 0, b"", 8192), (300, 2, b"c" * 151, 129_280),
                                                              (2**40, 7, b"\x00\xff", 65_536)])
def test_batch_response_equals_protobufs_encoding(rows: Rows, seq: int, epoch: int, cursor: bytes,
                                                  vocab: int) -> None:
    [encoded] = batch_response(rows, seq=seq, epoch=epoch, cursor=cursor, row=0, vocab_size=vocab)
    assert encoded == protobuf_encoded(rows, seq=seq, epoch=epoch, cursor=cursor, row=0, vocab_size=vocab)


def test_batch_response_decodes_to_the_rows() -> None:
    rows = packed(4, 64, True)
    response = feed_pb2.StreamResponse.FromString(*batch_response(rows, seq=9, epoch=1, cursor=b"x", row=0,
                                                                 vocab_size=129_280))
    assert (response.batch.seq, response.batch.epoch, response.batch.cursor) == (9, 1, b"x")
    arrays = decode_batch(response.batch, pack=True)
    assert (arrays["input_ids"] == rows.input_ids).all()


def random_pieces(sizes: list[int]) -> list[bytes | memoryview]:
    """Pieces of these sizes, alternately bytes and views of numpy arrays (as a batch's tensors are)."""
    rng = np.random.default_rng(len(sizes))
    return [memoryview(rng.integers(0, 256, n, dtype=np.uint8)) if i % 2 else rng.bytes(n)
            for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes", [[0], [3, 5], [2 * CHUNK + 1], [CHUNK - 1, 2, CHUNK, 7, 3 * CHUNK + 5, 0, 1]])
def test_join_of_a_big_response_in_chunks_equals_a_plain_join(sizes: list[int]) -> None:
    pieces = random_pieces(sizes)
    assert join(pieces) == b"".join(pieces)


def protobuf_parts(encoded: bytes) -> list[bytes]:
    """`encoded` cut into CHUNK-sized Parts by the generated protobuf classes."""
    starts = range(0, len(encoded), CHUNK)
    return [feed_pb2.StreamResponse(part=feed_pb2.Part(data=encoded[i:i + CHUNK], last=i + CHUNK >= len(encoded)))
            .SerializeToString() for i in starts]


@pytest.mark.parametrize("sizes", [[PARTS_OVER + 1], [2 * PARTS_OVER], [5, PARTS_OVER - 5, 1],
                                   [CHUNK - 1, 2, CHUNK, 7, 3 * CHUNK + 5], [200, 0, 4 * CHUNK + 127]])
def test_parts_equal_protobufs_encoding_and_join_into_the_response(sizes: list[int]) -> None:
    pieces = random_pieces(sizes)
    parts = messages(pieces, parts=True)
    assert parts == protobuf_parts(b"".join(pieces))
    read = [read_response(p) for p in parts]
    assert all(isinstance(p, Part) and len(p.data) <= CHUNK for p in read)
    assert b"".join(p.data for p in read if isinstance(p, Part)) == b"".join(pieces)


@pytest.mark.parametrize("sizes", [[0], [3, 5], [CHUNK + 1], [PARTS_OVER], [PARTS_OVER - 1, 1]])
def test_a_response_of_at_most_parts_over_bytes_is_one_message(sizes: list[int]) -> None:
    pieces = random_pieces(sizes)
    assert messages(pieces, parts=True) == messages(pieces, parts=False) == [b"".join(pieces)]


def test_a_big_batch_in_parts_reads_back_as_the_whole_response() -> None:
    rows = packed(64, 16384, True)
    [encoded] = batch_response(rows, seq=3, epoch=1, cursor=b"c", row=0, vocab_size=129_280)
    parts = batch_response(rows, seq=3, epoch=1, cursor=b"c", row=0, vocab_size=129_280, parts=True)
    assert len(parts) == -(-len(encoded) // CHUNK) > 1
    [response] = whole(map(read_response, parts), None)
    assert response.SerializeToString() == encoded
