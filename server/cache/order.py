"""Cached-mode order: a seeded permutation of the store per epoch, and the batches each rank sends."""

from __future__ import annotations

import numpy as np

from .store import TokenStore


def epoch_order(n: int, seed: int | None, epoch: int) -> np.ndarray:
    """Sample indices in epoch order: a fresh permutation per epoch when seeded, else store order."""
    if seed is None:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(store: TokenStore, order: np.ndarray, *, world_size: int, batch_size: int, seq_len: int,
                  pack: bool, remainder: str) -> int | None:
    """Batches every rank sends this epoch, equal across ranks: the most any rank needs (`pad`), the
    fewest full ones (`drop`), or None (`keep`: each rank sends what it has)."""
    if remainder == "keep":
        return None
    shares = [order[r::world_size] for r in range(world_size)]
    if pack:
        units = np.array([store.lengths[s].sum() for s in shares], dtype=np.int64)
        per_batch = batch_size * seq_len
    else:
        units = np.array([len(s) for s in shares], dtype=np.int64)
        per_batch = batch_size
    if remainder == "drop":
        return int((units // per_batch).min())
    return int(-(-units.max() // per_batch))
