"""Rows to protocol messages: raw little-endian tensors, only what the client cannot cheaply derive.

A batch response is encoded by hand around its tensors' buffers and joined once: protobuf's own
encoder copies a large bytes field several times over (about 1 ms for a 16x4096 batch, several times
the cost of making the batch). The bytes are exactly what `StreamResponse(batch=...).SerializeToString()`
gives (fields in number order), so clients parse them with the generated classes. For a client that accepts
parts, a response over PARTS_OVER bytes is framed straight into Part messages of CHUNK bytes of it each, again
exactly as protobuf would encode them, so that the event loop never writes more than about CHUNK of it at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np

from ...protos import feed_pb2
from ..rows.batch import Rows
from ..store.format import ids_dtype

Buffer = bytes | memoryview

_RESPONSE_BATCH = feed_pb2.StreamResponse.DESCRIPTOR.fields_by_name["batch"].number
_RESPONSE_PART = feed_pb2.StreamResponse.DESCRIPTOR.fields_by_name["part"].number
_BATCH_TENSORS = feed_pb2.Batch.DESCRIPTOR.fields_by_name["tensors"].number
_TENSOR_DATA = feed_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number
_PART_DATA = feed_pb2.Part.DESCRIPTOR.fields_by_name["data"].number
_PART_LAST = feed_pb2.Part(last=True).SerializeToString()  # the `last: true` field, after the data
_GIL_FREE_JOIN = 1 << 20  # bytes.join drops the GIL from this many bytes on (all of them bytes objects)
CHUNK = 256 << 10
"""Bytes copied under the GIL at a time when making a big response, and the most a Part carries. Writing one
message holds the event loop (and the GIL) for gRPC's copy of it and, on loopback, the kernel's send: about
0.1 ms for 256 KiB against 0.3 ms for 1 MiB on 2 busy cores, and another stream's batch waits for at most
one such write (clients join Parts of any size)."""
PARTS_OVER = 1 << 20
"""A response over this many bytes goes to a client that accepts Parts as Parts; smaller ones go whole (one
write of at most this much: a 16x4096 batch stays one message)."""


def batch_response(rows: Rows, *, seq: int, epoch: int, cursor: bytes, row: int, vocab_size: int,
                   parts: bool = False) -> list[bytes]:
    """The StreamResponse carrying a set of rows (packed rows carry segments, padded rows their lengths), as
    the messages to write (see `messages`); each tensor's buffer is copied once, into them."""
    tensors = [("input_ids", rows.input_ids.astype(ids_dtype(vocab_size), copy=False))]
    if rows.row_segments is None:
        tensors.append(("lengths", rows.lengths))
    else:
        tensors += [("segment_lengths", rows.lengths), ("row_segments", rows.row_segments)]
    if rows.loss_mask is not None:
        tensors.append(("loss_mask", rows.loss_mask))
    batch: list[Buffer] = [feed_pb2.Batch(seq=seq, epoch=epoch).SerializeToString()]
    for name, array in tensors:
        batch += _field(_BATCH_TENSORS, _tensor(name, array))
    batch.append(feed_pb2.Batch(cursor=cursor, tokens=rows.tokens, row=row).SerializeToString())
    return messages(_field(_RESPONSE_BATCH, batch), parts)


def messages(pieces: list[Buffer], parts: bool) -> list[bytes]:
    """A serialized response given as pieces, as the messages to write: itself, or (when `parts` and it is over
    PARTS_OVER bytes) Part messages of CHUNK bytes of it each, the last one marked."""
    if not parts or sum(len(p) for p in pieces) <= PARTS_OVER:
        return [join(pieces)]
    chunks = list(_chunks(pieces))
    return _taking_turns(_part(chunk, last=i == len(chunks) - 1) for i, chunk in enumerate(chunks))


def join(pieces: list[Buffer]) -> bytes:
    """The pieces as one bytes object, holding the GIL for at most CHUNK bytes of copying at a time.

    bytes.join holds the GIL while it copies from buffers such as numpy arrays (tens of ms for a 1024x32768
    batch on a busy machine, during which the event loop serving every other stream cannot run), but drops
    it while copying from bytes objects when they total 1 MiB or more. So a big response is first gathered
    into CHUNK-sized bytes, short GIL-held copies, then joined with the GIL released."""
    if sum(len(p) for p in pieces) <= max(2 * CHUNK, _GIL_FREE_JOIN):
        return b"".join(pieces)
    return b"".join(_taking_turns(b"".join(chunk) for chunk in _chunks(pieces)))


def _taking_turns(made: Iterable[bytes]) -> list[bytes]:
    """The items, the GIL dropped after each is made, so that a thread waiting for it takes it then.

    A worker making a big response otherwise keeps the GIL from one copy to the next until the switch interval
    forces a hand-off: the event loop, and every stream it serves, waited up to that long (0.5 ms) at each of
    its many GIL acquisitions (a probe thread's median wait while a 1024x32768 batch's Parts were cut: 0.9 ms,
    0.28 ms with this; bench/README.md). It costs a system call per CHUNK copied (about 1 µs against the
    copy's 20-50 µs)."""
    out = []
    for item in made:
        out.append(item)
        time.sleep(0)  # releases the GIL; a waiting thread takes it before this one goes on
    return out


def _chunks(pieces: list[Buffer]) -> Iterator[list[Buffer]]:
    """The pieces' bytes as consecutive lists of slices (no copy) of CHUNK bytes each, the last one shorter."""
    pending: list[Buffer] = []
    size = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            take = view[:CHUNK - size]
            pending.append(take)
            size += len(take)
            view = view[len(take):]
            if size == CHUNK:
                yield pending
                pending, size = [], 0
    if pending:
        yield pending


def _part(chunk: list[Buffer], *, last: bool) -> bytes:
    """The Part response carrying the chunk's bytes (one GIL-held copy of at most CHUNK bytes)."""
    return b"".join(_field(_RESPONSE_PART, [*_field(_PART_DATA, chunk), *([_PART_LAST] if last else [])]))


def _tensor(name: str, array: np.ndarray) -> list[Buffer]:
    """A Tensor message's pieces: name, dtype and shape encoded by protobuf, then the raw data (no copy)."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    header = feed_pb2.Tensor(name=name, dtype=array.dtype.str, shape=list(array.shape)).SerializeToString()
    if not array.size:
        return [header]  # protobuf leaves an empty bytes field out
    return [header, *_field(_TENSOR_DATA, [array.data.cast("B")])]


def _field(number: int, pieces: list[Buffer]) -> list[Buffer]:
    """A length-delimited field (protobuf wire type 2) whose payload is the concatenated pieces."""
    return [_varint(number << 3 | 2), _varint(sum(len(p) for p in pieces)), *pieces]


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint encoding of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
