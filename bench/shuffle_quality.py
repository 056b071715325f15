"""How well the cached mode's shard-aware order shuffles (bench/locality.py): how far apart in delivery order the
samples of one source file land, for an epoch's layout and for a global permutation of the same data."""

from __future__ import annotations

import numpy as np

from sigil_feed.server.cached.layout import EpochLayout, block_bounds, blocks, epoch_layout
from sigil_feed.server.store.reader import TokenStore


def delivery_positions(layout: EpochLayout) -> np.ndarray:
    """Per item of `layout.items`: its global row when rows are padded (one item each), which is row i of the
    block of virtual rank v (see `blocks`) at i * V + v."""
    count = layout.virtual
    first, _ = blocks(len(layout.items), layout.region)
    owner = np.empty(count, dtype=np.int64)
    owner[layout.region] = np.arange(count)
    k = np.arange(len(layout.items), dtype=np.int64)
    v = owner[np.searchsorted(block_bounds(len(layout.items), layout.region), k, side="right") - 1]
    return (k - first[v]) * count + v


def same_file_distances(store: TokenStore, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Distances in delivery order between consecutive deliveries of samples of one source file, over the
    number of items delivered (0 to 1: 0 is back to back)."""
    files = store.source[items].astype(np.int64) * (int(store.file.max(initial=0)) + 1) + store.file[items]
    order = np.lexsort((positions, files))
    same = files[order][1:] == files[order][:-1]
    return (np.diff(positions[order])[same] / max(len(items), 1)).astype(np.float64)


def shuffle_quality(store: TokenStore, sequence: np.ndarray, *, virtual: int, seed: int, epoch: int,
                    window_shards: int) -> dict[str, float]:
    """The median and 10th percentile of same_file_distances for this layout and for a global permutation of the
    served sequence (the order before virtual ranks), same data, same epoch."""
    layout = epoch_layout(store, sequence, virtual=virtual, seed=seed, epoch=epoch, window_shards=window_shards)
    permuted = sequence[np.random.default_rng([seed, epoch]).permutation(len(sequence))]
    ours = same_file_distances(store, layout.items, delivery_positions(layout))
    global_ = same_file_distances(store, permuted, np.arange(len(permuted)))
    return {"median": float(np.median(ours)), "p10": float(np.percentile(ours, 10)),
            "global_median": float(np.median(global_)), "global_p10": float(np.percentile(global_, 10))}
