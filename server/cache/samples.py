"""Cached-mode order: a seeded permutation of the store per epoch, dealt to ranks, read from the memory map."""

from __future__ import annotations

import numpy as np

from ..stage import State
from ..tokenize import Encoded
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


class CachedSamples:
    """This rank's share of the epoch's permutation, as encoded samples sliced from the memory map."""

    def __init__(self, store: TokenStore, order: np.ndarray, *, rank: int, world_size: int) -> None:
        self.store = store
        self.share = order[rank::world_size]
        self.index = 0

    def __iter__(self) -> CachedSamples:
        return self

    def __next__(self) -> Encoded:
        if self.index >= len(self.share):
            raise StopIteration
        j = self.share[self.index]
        self.index += 1
        start = self.store.offsets[j]
        ids = np.asarray(self.store.tokens[start:start + self.store.lengths[j]], dtype=np.int32)
        return Encoded(ids, int(self.store.prompt_tokens[j]))

    def get_state(self) -> State:
        """Position in the rank's share."""
        return {"index": self.index}

    def set_state(self, state: State) -> None:
        """Continue at a position in the rank's share."""
        self.index = int(state["index"])
