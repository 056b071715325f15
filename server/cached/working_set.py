"""The shards some ranks of a job read in one epoch of a token store's layout, and the most of them they read at
once: what a sidecar's shard cache must hold to fetch each shard about once per epoch.

Rank r of w reads the global rows of one residue class c mod w (the deal's: c = r, or its node-aware class,
rows/deal.py); global row e is row e // V of virtual rank e mod V, so over an epoch rank r reads the virtual
ranks v = c (mod gcd(w, V)): only its own when w divides V, every one when gcd(w, V) is 1. A virtual rank reads
its block of rows, which is its region's items (to within a row at its ends), in order, one row (`seq_len`
tokens packed, one item padded) per V global rows, so all virtual ranks advance alike: in token position
(packed) or item position (padded) within their regions. A virtual rank uses a shard from the first to the last
of its items there (within a window of shuffled shards they interleave); the bytes of the shards in use at a
position, summed over the virtual ranks the ranks read (a shard counted once), peak somewhere in the epoch: that
peak is the working set. A cache smaller than it refetches shards; one at least as large (plus the shards fetched
ahead) fetches each about once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from math import gcd
from typing import TYPE_CHECKING

import numpy as np

from ..rows.deal import Deal

if TYPE_CHECKING:  # the CLI imports this module to print working sets: it needs no layout code
    from .layout import EpochLayout

CACHE_HEADROOM = 1.5
"""The shard cache to suggest for a working set: room for the shards fetched ahead and those pinned in transit."""


@dataclass(frozen=True)
class WorkingSet:
    """What some ranks read in one epoch: the most shard bytes in use at once, and every shard they read."""

    peak_bytes: int  # the most bytes of shards in use at one position of the epoch
    epoch_bytes: int  # bytes of every shard the ranks read in the epoch (their share of the store)
    shards: int  # how many shards that is
    virtual: int  # how many virtual ranks the ranks read


def virtual_ranks_read(virtual: int, world_size: int, ranks: Iterable[int]) -> np.ndarray:
    """The virtual ranks these ranks of `world_size` read over an epoch of `virtual` virtual ranks."""
    step, residues = gcd(virtual, world_size), set()
    for rank in ranks:
        residue = Deal(rank, world_size, 1, virtual).residue  # node-aware, or None: the rank's own class
        residues.add((rank if residue is None else residue) % step)
    v = np.arange(virtual, dtype=np.int64)
    return v[np.isin(v % step, sorted(residues))]


def working_set(layout: EpochLayout, shard: np.ndarray, shard_bytes: np.ndarray, *, world_size: int,
                ranks: Iterable[int], pack: bool) -> WorkingSet:
    """The working set of `ranks` of `world_size` in the epoch `layout` (`shard`: each store sample's shard,
    `shard_bytes`: each shard's bytes in the cache; `pack`: rows are token spans, else one item each)."""
    vs = virtual_ranks_read(layout.virtual, world_size, ranks)
    q = layout.region[vs]
    starts, counts = layout.bounds[q], layout.bounds[q + 1] - layout.bounds[q]
    total = int(counts.sum())
    if total == 0:
        return WorkingSet(0, 0, 0, len(vs))
    first = np.repeat(starts, counts)
    index = first + np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)  # positions in layout.items
    used = shard[layout.items[index]].astype(np.int64)
    if pack:
        lo, hi = layout.cum[index] - layout.cum[first], layout.cum[index + 1] - layout.cum[first]
    else:
        lo = index - first
        hi = lo + 1
    owner = np.repeat(np.arange(len(vs), dtype=np.int64), counts)
    del index, first
    # Each (virtual rank, shard) pair: from its first item's start to its last item's end.
    shards_n = int(used.max()) + 1
    pair = owner * shards_n + used
    order = np.argsort(pair, kind="stable")
    pair, lo, hi = pair[order], lo[order], hi[order]
    cut = np.flatnonzero(np.diff(pair)) + 1
    heads = np.concatenate(([0], cut))
    pair_shard, pair_lo = pair[heads] % shards_n, np.minimum.reduceat(lo, heads)
    pair_hi = np.maximum.reduceat(hi, heads)
    # A shard in use by several virtual ranks at once counts once: merge its overlapping spans.
    span = int(pair_hi.max()) + 1
    order = np.lexsort((pair_lo, pair_shard))
    s, a, b = pair_shard[order], pair_lo[order] + pair_shard[order] * span, pair_hi[order] + pair_shard[order] * span
    reach = np.maximum.accumulate(b)
    new = np.concatenate(([True], a[1:] >= reach[:-1]))
    heads = np.flatnonzero(new)
    s, a, b = s[heads], a[heads] - s[heads] * span, np.maximum.reduceat(b, heads) - s[heads] * span
    size = shard_bytes[s].astype(np.int64)
    # Sweep: a span's bytes count from its start to its end (an end before a start at the same position).
    at = np.concatenate((a, b))
    change = np.concatenate((size, -size))
    order = np.lexsort((change > 0, at))
    peak = int(np.cumsum(change[order]).max())
    distinct = np.unique(s)
    return WorkingSet(peak, int(shard_bytes[distinct].sum()), len(distinct), len(vs))


def cache_gb_to_fit(peak_bytes: int) -> float:
    """The `shard_cache_gb` to set for a working set of `peak_bytes`: CACHE_HEADROOM times it, in GB (10^9),
    rounded up to two significant digits."""
    gb = peak_bytes * CACHE_HEADROOM / 1e9
    if gb <= 0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(gb)) - 1)
    return round(math.ceil(gb / unit - 1e-9) * unit, 12)


def rank_ranges(values: Iterable[int]) -> str:
    """Sorted ranks as runs: 0-3,6."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
