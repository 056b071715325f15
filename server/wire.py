"""Rows to protocol messages: raw little-endian tensors, only what the client cannot cheaply derive."""

from __future__ import annotations

import numpy as np

from ..protos import feed_pb2
from .pack import Rows


def tensor(name: str, array: np.ndarray) -> feed_pb2.Tensor:
    """A named array as raw little-endian bytes with its numpy dtype string and shape."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return feed_pb2.Tensor(name=name, dtype=array.dtype.str, shape=list(array.shape), data=array.tobytes())


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 on the wire when every id fits, else int32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def to_batch(rows: Rows, *, seq: int, epoch: int, cursor: bytes, vocab_size: int) -> feed_pb2.Batch:
    """The Batch message for a set of rows (packed rows carry segments, padded rows their lengths)."""
    tensors = [tensor("input_ids", rows.input_ids.astype(ids_dtype(vocab_size)))]
    if rows.row_segments is None:
        tensors.append(tensor("lengths", rows.lengths))
    else:
        tensors += [tensor("segment_lengths", rows.lengths), tensor("row_segments", rows.row_segments)]
    if rows.loss_mask is not None:
        tensors.append(tensor("loss_mask", rows.loss_mask))
    return feed_pb2.Batch(seq=seq, epoch=epoch, tensors=tensors, cursor=cursor, tokens=rows.tokens)
