"""Detect loader wrappers that would mis-read a sharded, already batched stream, and name the fix."""

from __future__ import annotations

import sys
from types import FrameType

from .stream import FeedError

_ACCELERATE_LOADERS = frozenset({"DataLoaderShard", "DataLoaderDispatcher", "SkipDataLoader"})
_MAX_DEPTH = 24


class WrappedLoaderError(FeedError, TypeError):
    """A FeedDataset was iterated through a wrapper that breaks sharding or the saved position."""


def check_not_wrapped(depth: int = _MAX_DEPTH) -> None:
    """Raise if the caller's stack (its nearest `depth` frames) runs an Accelerate-prepared DataLoader (stock HF
    Trainer included).

    accelerator.prepare(loader) lets rank 0 read for every rank (dispatch_batches, the default for an
    IterableDataset: the other ranks' shares are never read) or re-shards a stream the server already
    sharded (dispatch_batches=False: it fails on batch_size=None), and it reads a batch ahead.
    """
    owners = {type(owner) for owner in _frame_owners(sys._getframe(1), depth)}
    if not any(cls.__module__.startswith("accelerate.") and cls.__name__ in _ACCELERATE_LOADERS
               for cls in owners):
        return
    if any(base.__module__.startswith("transformers.") and base.__name__ == "Trainer"
           for cls in owners for base in cls.__mro__):
        raise WrappedLoaderError(
            "a stock transformers Trainer cannot train on a FeedDataset: it re-batches the ready batches "
            "through a collator and shards them again through Accelerate. Use "
            "sigil_feed.client.integrations.hf_trainer.FeedTrainer (or integrations.trl.FeedSFTTrainer) with "
            "train_dataset=FeedDataset(...)")
    raise WrappedLoaderError(
        "accelerator.prepare(DataLoader(FeedDataset(...))) would let rank 0 read for every rank (or re-shard "
        "a stream the server already shards) and read a batch ahead of training. Prepare only the model and "
        "optimizer, iterate DataLoader(feed, batch_size=None) directly, and register "
        "sigil_feed.client.integrations.accelerate.FeedCheckpoint(feed) for save_state/load_state")


def _frame_owners(frame: FrameType | None, depth: int) -> list[object]:
    """The `self` of each of the nearest `depth` calling frames that are methods."""
    owners = []
    for _ in range(depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if owner is not None:
            owners.append(owner)
        frame = frame.f_back
    return owners
