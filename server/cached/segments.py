"""Cached mode: an epoch under more than one mixture (a phase that starts inside it, a resume under another mixture),
as segments of global rows.

An epoch's plan (feed/mixtures.py) lists mixtures with the global row each applies from. Segment 0 is the epoch's
layout under its first mixture. Segment i, from row s_i on, is laid out (like any epoch, over the same V virtual
ranks) from what segments before it left unserved: each store sample's copies under segment i's mixture (task
weights) less the times rows before s_i served it (wholly or in part: a sample cut by s_i is not served again,
its rest is left out), mixed by segment i's source weights; its row r is the epoch's global row s_i + r. So rows
after s_i follow the new mixture, and a sample served before s_i comes again only when its source has nothing
unserved left (`all_exhausted` restarting it), as in any epoch. Every rank of any world size computes the same
segments from the plan alone, and the packer cuts each global row from the segment it falls in (packer.py). A
segment left with fewer samples than V, or starting past the rows of the one before (a cursor after the epoch's
last step, a phase from a row the epoch does not reach), ends the epoch at the end of the one before: the new
mixture takes effect with the next epoch. A segment may be laid out over another token store than the one before
(a source added to or removed from `names` inside the epoch): the served counts follow each source by its content
(source_keys.py), so a source added starts at its first sample and one removed keeps its progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ..store.reader import TokenStore
from .layout import EpochLayout, blocks, epoch_layout
from .source_keys import source_keys

M = TypeVar("M")
"""A mixture."""


def layout_rows(layout: EpochLayout, *, seq_len: int, pack: bool) -> int:
    """The layout's rows (packed: its tokens cut into rows; padded: one item each)."""
    return -(-int(layout.cum[-1]) // seq_len) if pack else len(layout.items)


def served_counts(store: TokenStore, layout: EpochLayout, rows: int, *, seq_len: int, pack: bool) -> np.ndarray:
    """How many times the layout's first `rows` global rows serve each store sample, wholly or in part."""
    virtual = layout.virtual
    units = int(layout.cum[-1]) if pack else len(layout.items)
    total = layout_rows(layout, seq_len=seq_len, pack=pack)
    first, sizes = blocks(total, layout.region)
    v = np.arange(virtual)
    taken = np.clip((min(rows, total) - v + virtual - 1) // virtual, 0, sizes)  # rows of v's block below `rows`
    if pack:
        lo, hi = first * seq_len, np.minimum((first + taken) * seq_len, units)
        start = np.searchsorted(layout.cum, lo, side="right") - 1
        stop = np.where(hi > lo, np.searchsorted(layout.cum, hi, side="left"), start)
    else:
        start, stop = first, first + taken
    picked = np.concatenate([np.arange(a, b) for a, b in zip(start.tolist(), stop.tolist(), strict=True)] or
                            [np.zeros(0, dtype=np.int64)])
    return np.bincount(layout.items[np.unique(picked)], minlength=len(store.lengths))  # an item two blocks cut: once


Over = Callable[[M], tuple[TokenStore, Callable[[M, np.ndarray | None], np.ndarray]]]
"""A mixture's token store and served sequence (`sequence(mixture, served)`: less `served`, counts per store
sample)."""


def segments(first: EpochLayout, plan: list[tuple[int, M]], over: Over[M], *, virtual: int, seed: int | None,
             epoch: int, window_shards: int, seq_len: int, pack: bool) -> list[tuple[int, EpochLayout, TokenStore]]:
    """The segments of `plan` ((start row, mixture) pairs; `first` is segment 0's layout): each one's first global
    row, layout and token store. A mixture over another store than the segment before (a source added or removed
    inside the epoch) takes each source's served counts by its content key (source_keys.py): a source the epoch
    served before continues with what it left unserved, a new one starts whole, and a source that leaves keeps
    its counts for a later segment that brings it back."""
    store = over(plan[0][1])[0]
    served = np.zeros(len(store.lengths), dtype=np.int64)
    progress: dict[str, np.ndarray] = {}  # by source key: the served counts of sources left behind
    layout, offset = first, 0
    done = [(0, first, store)]
    for index, (start, mixture) in enumerate(plan[1:], start=1):
        over_end = start - offset >= layout_rows(layout, seq_len=seq_len, pack=pack)  # a resume past the epoch's end
        served += served_counts(store, layout, start - offset, seq_len=seq_len, pack=pack)
        target, sequence = over(mixture)
        if target is not store:
            served = _carried(store, served, target, progress)
            store = target
        items = sequence(mixture, served)
        if over_end or len(items) < virtual:
            items = items[:0]
        layout = epoch_layout(store, items, virtual=virtual, seed=seed, epoch=epoch + (index << 32),
                              window_shards=window_shards, pack=pack)
        offset = start
        done.append((offset, layout, store))
    return done


def _carried(store: TokenStore, served: np.ndarray, target: TokenStore, progress: dict[str, np.ndarray]) -> np.ndarray:
    """`served` (counts per sample of `store`) as counts per sample of `target`, by source; every source of
    `store` has its counts kept in `progress`, from which `target`'s sources take theirs (none: it starts whole)."""
    for source, key in enumerate(source_keys(store)):
        progress[key] = served[store.source == source]
    carried = np.zeros(len(target.lengths), dtype=np.int64)
    for source, key in enumerate(source_keys(target)):
        if key in progress:
            carried[target.source == source] = progress[key]
    return carried
