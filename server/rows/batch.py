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
