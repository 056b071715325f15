"""Turn a Batch message into model inputs with numpy only: no per-token or per-row Python work."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..protos import feed_pb2

IGNORE_INDEX = -100
"""Label value that PyTorch's cross-entropy (and Hugging Face models) skip."""


def tensor_array(tensor: feed_pb2.Tensor) -> np.ndarray:
    """View a wire Tensor as a read-only numpy array of its dtype and shape."""
    dtype = np.dtype(tensor.dtype)
    if dtype.kind not in "biu":
        raise ValueError(f"tensor {tensor.name!r}: unsupported dtype {tensor.dtype!r}")
    shape = tuple(tensor.shape)
    data = tensor.data
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {tensor.name!r}: {len(data)} bytes do not fit shape {shape} "
                         f"of dtype {tensor.dtype!r}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def decode_batch(batch: feed_pb2.Batch, pack: bool) -> dict[str, np.ndarray]:
    """Decode a batch into int64 input_ids, labels and position_ids (packed) or attention_mask."""
    tensors = {t.name: tensor_array(t) for t in batch.tensors}
    ids = _require(tensors, "input_ids", ndim=2).astype(np.int64)
    labels, extra = _decode_packed(tensors, ids) if pack else _decode_padded(tensors, ids)
    loss_mask = tensors.get("loss_mask")
    if loss_mask is not None:
        if loss_mask.shape != ids.shape:
            raise ValueError(f"loss_mask has shape {loss_mask.shape}, input_ids {ids.shape}")
        labels[loss_mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, **extra}


def varlen_kwargs(position_ids: np.ndarray) -> dict[str, Any]:
    """FlashAttention varlen kwargs for packed rows, in the form DataCollatorWithFlattening returns them.

    The rows are read as one flattened sequence (as FlashAttention's varlen kernels do with a [B, L] batch).
    decode_batch restarts `position_ids` at 0 exactly where a run starts: each segment, and a row's trailing
    padding, so the zeros are the sequence starts and `cu_seq_lens` is one flatnonzero. Returns int32
    `cu_seq_lens_q`/`cu_seq_lens_k` and int `max_length_q`/`max_length_k`.
    """
    flat = position_ids.reshape(-1)
    cu_seq_lens = np.append(np.flatnonzero(flat == 0), flat.size).astype(np.int32)
    max_length = int(np.diff(cu_seq_lens).max(initial=0))
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens.copy(),
            "max_length_q": max_length, "max_length_k": max_length}


def _require(tensors: dict[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    """Return the named tensor, checking that it is present and has `ndim` dimensions."""
    if name not in tensors:
        raise ValueError(f"batch has no {name!r} tensor (has {sorted(tensors)})")
    array = tensors[name]
    if array.ndim != ndim:
        raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {ndim} dimensions")
    return array


def _decode_padded(tensors: dict[str, np.ndarray], ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Padded rows: labels and attention_mask from `lengths`."""
    rows, seq_len = ids.shape
    lengths = _require(tensors, "lengths", ndim=1).astype(np.int64)
    if lengths.shape != (rows,) or (lengths < 0).any() or (lengths > seq_len).any():
        raise ValueError(f"lengths {lengths.tolist()} do not fit input_ids of shape {ids.shape}")
    real = np.arange(seq_len) < lengths[:, None]
    return np.where(real, ids, IGNORE_INDEX), {"attention_mask": real.astype(np.int64)}


def _decode_packed(tensors: dict[str, np.ndarray], ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Packed rows: labels (none on a segment's first token or on padding) and position_ids restarting
    at every run (each segment, and a row's trailing padding), from a few passes over the batch."""
    rows, seq_len = ids.shape
    seg_lengths = _require(tensors, "segment_lengths", ndim=1).astype(np.int64)
    row_segments = _require(tensors, "row_segments", ndim=1).astype(np.int64)
    _check_segments(seg_lengths, row_segments, rows)
    seg_ends = np.concatenate(([0], np.cumsum(seg_lengths)))
    row_first_seg = np.cumsum(row_segments) - row_segments
    row_offset = seg_ends[row_first_seg]
    real = seg_ends[row_first_seg + row_segments] - row_offset
    if (real > seq_len).any():
        raise ValueError(f"segments fill rows with {real.max()} tokens, more than seq_len {seq_len}")
    seg_row = np.repeat(np.arange(rows), row_segments)
    seg_starts = seg_row * seq_len + seg_ends[:-1] - row_offset[seg_row]
    pad_rows = np.flatnonzero(real < seq_len)
    run_starts = np.concatenate((seg_starts, pad_rows * seq_len + real[pad_rows]))
    run_lengths = np.concatenate((seg_lengths, seq_len - real[pad_rows]))
    order = np.argsort(run_starts, kind="stable")
    positions = np.arange(rows * seq_len) - np.repeat(run_starts[order], run_lengths[order])
    labels = ids.copy()
    labels.reshape(-1)[seg_starts] = IGNORE_INDEX
    for row in pad_rows:
        labels[row, real[row]:] = IGNORE_INDEX
    return labels, {"position_ids": positions.reshape(ids.shape)}


def _check_segments(seg_lengths: np.ndarray, row_segments: np.ndarray, rows: int) -> None:
    """Reject segment tensors that cannot describe `rows` rows."""
    if row_segments.shape != (rows,) or (row_segments < 0).any():
        raise ValueError(f"row_segments {row_segments.tolist()} do not describe {rows} rows")
    if row_segments.sum() != seg_lengths.size or (seg_lengths <= 0).any():
        raise ValueError(f"{seg_lengths.size} segment_lengths (min {seg_lengths.min(initial=1)}) do not "
                         f"match row_segments totalling {row_segments.sum()}")
