"""A batch as both modes produce it: rows of token ids with what the client needs to see their samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Rows:
    """One batch of rows, ready for the wire."""

    input_ids: np.ndarray  # [rows, seq_len] token ids (int32, or the token store's dtype)
    lengths: np.ndarray  # padded: real tokens per row; packed: segment lengths, row-major
    row_segments: np.ndarray | None  # packed: segments per row
    loss_mask: np.ndarray | None  # [rows, seq_len] uint8, 1 = trained on; with completion_only
    tokens: int  # real tokens


def joined(parts: list[Rows]) -> Rows:
    """One batch of the rows of `parts`, in order (all of one kind: packed or padded, with or without masks)."""
    if len(parts) == 1:
        return parts[0]
    segments = [p.row_segments for p in parts]
    masks = [p.loss_mask for p in parts]
    return Rows(np.concatenate([p.input_ids for p in parts]), np.concatenate([p.lengths for p in parts]),
                None if segments[0] is None else np.concatenate(segments),  # type: ignore[arg-type]
                None if masks[0] is None else np.concatenate(masks),  # type: ignore[arg-type]
                sum(p.tokens for p in parts))
