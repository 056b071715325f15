"""Cached-mode order: the served sequence of store samples (mixing and task weights applied at serve time),
a seeded permutation of it per epoch, and the batches each rank sends."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..curate import task_copies
from ..mixing import interleave
from ..store.reader import TokenStore


def served_sequence(store: TokenStore, *, sources: int, mode: str, stopping: str, weights: Sequence[float],
                    task_weights: dict[str, float] | None, seed: int) -> np.ndarray:
    """Store sample indices in mix order: each source's samples in store order, each repeated by its task
    weight's copies, interleaved as the streaming Mixer does; the same multiset streaming mode serves."""
    repeats = task_copies(store.task, store.task_types, task_weights, seed, (store.source, store.file, store.row))
    per_source = [np.repeat(picked, repeats[picked]) for picked in (np.flatnonzero(store.source == k)
                                                                     for k in range(sources))]
    child, position = interleave([len(s) for s in per_source], mode, stopping, weights, seed)
    starts = np.concatenate(([0], np.cumsum([len(s) for s in per_source])))
    flat = np.concatenate(per_source) if per_source else np.zeros(0, dtype=np.int64)
    return flat[starts[child] + position]


def epoch_order(sequence: np.ndarray, seed: int | None, epoch: int) -> np.ndarray:
    """The served sequence in epoch order: a fresh permutation per epoch when seeded, else as it is."""
    if seed is None:
        return sequence
    return sequence[np.random.default_rng([seed, epoch]).permutation(len(sequence))]


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
