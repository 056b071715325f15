"""Thin sigil-feed client: stream batches from the sidecar; FeedDataset (needs torch) is imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .attention import PackedAttentionError, PackedAttentionWarning, check_packed_attention
from .decode import IGNORE_INDEX, decode_batch, varlen_kwargs
from .position import FeedState, PositionedBatch, batch_state
from .stream import (
    BatchStream,
    EpochEnd,
    FeedBatch,
    FeedConnectionError,
    FeedError,
    FeedServerError,
)

if TYPE_CHECKING:
    from .dataset import FeedDataset

__all__ = [
    "IGNORE_INDEX",
    "BatchStream",
    "EpochEnd",
    "FeedBatch",
    "FeedConnectionError",
    "FeedDataset",
    "FeedError",
    "FeedServerError",
    "FeedState",
    "PackedAttentionError",
    "PackedAttentionWarning",
    "PositionedBatch",
    "batch_state",
    "check_packed_attention",
    "decode_batch",
    "varlen_kwargs",
]


def __getattr__(name: str) -> Any:
    """Import FeedDataset (and with it torch) only when it is asked for."""
    if name == "FeedDataset":
        from .dataset import FeedDataset

        return FeedDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
