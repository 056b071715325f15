"""Cached-mode order: the served sequence of store samples (mixing and task weights applied at serve time), and
each epoch's shard-aware layout over V virtual ranks.

Seeded, an epoch permutes the store's shards by (seed, epoch), cuts the items (in that shard order) into V
contiguous regions balanced by what the epoch's rows hold (tokens when rows are packed; items when each row is
one sample, exactly the blocks of `blocks`), and shuffles items within windows of a few consecutive shards of
each region (packed: a region's first and last shards are groups of their own at its ends, so the rows of a
virtual rank, whose block ends within about a row of its region's end, meet the next region only in the
shard they share). Unseeded, the served sequence is cut into V regions in order and nothing is shuffled.

The epoch's rows (cache/pack.py) are its items' one stream cut into rows and dealt to the virtual ranks in
blocks of equally many rows (`blocks`), so global row e is row e // V of virtual rank e mod V for every row:
an epoch's waste never depends on V, the lengths or the regions' balance. Virtual rank v reads the block of
region rho(v) (mixed-radix digit reversal), so that rank r of a world size w that is a prefix product of V's
ascending prime factors (for `auto`'s choices: 2, 4, ..., 1024, then x 3, 3, 5, 7) reads one contiguous run of
regions, about 1/w of the store's shards (the deal gives rank r the r-th run, so a node's consecutive ranks read
one run: `rank_regions`); any other w that divides V (6, 12, 24, 48, 96, ...) reads 1/w of the
regions, not contiguous. No assignment of regions makes two world sizes contiguous unless one divides the
other: for 48 and 64, each class mod 16 would be 3 runs (mod 48) of 4 units and 4 runs (mod 64) of 3 units,
every run of the one meeting every run of the other in exactly one unit, which a run of 4 units cannot do
with 4 runs longer than one unit. So the ascending order favours the powers of two of real job shapes (8
ranks per node x 2^k nodes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..pipeline.curate import task_copies
from ..pipeline.mixing import interleave
from ..rows.deal import Deal, prime_factors
from ..store.reader import TokenStore

AUTO_VIRTUAL = (1, 2, 4, 8, 16, 48, 96, 192, 384, 768, 1536, 3072, 9216, 46080, 322560)
"""The virtual rank counts `virtual_ranks: auto` chooses from. Each divides the next, so a world size that divides
the choice for a dataset divides it for every larger one. From 1536 on, every power of two up to 512 (8 ranks per
node x 1-64 nodes) and 6, 12, 24, 48, 96 divide it; from 3072 (2^10 x 3) every power of two up to 1024 (x 128
nodes); 322560 = 2^10 x 3^2 x 5 x 7 adds 8 x 3, 5, 6, 7, 9, 10, 12, 14, 15, ... nodes."""
ITEMS_PER_VIRTUAL = 64
"""`auto` chooses the largest count that leaves every virtual rank at least this many served items."""


def served_sequence(store: TokenStore, *, sources: int, mode: str, stopping: str, weights: Sequence[float],
                    task_weights: dict[str, float] | None, seed: int, served: np.ndarray | None = None) -> np.ndarray:
    """Store sample indices in mix order: each source's samples in store order, each repeated by its task
    weight's copies (less the times `served` counts, for an epoch's later segment: segments.py), interleaved as
    the streaming Mixer does; the same multiset streaming mode serves."""
    repeats = task_copies(store.task, store.task_types, task_weights, seed, (store.source, store.file, store.row))
    if served is not None:
        repeats = np.maximum(repeats - served, 0)
    per_source = [np.repeat(picked, repeats[picked]) for picked in (np.flatnonzero(store.source == k)
                                                                     for k in range(sources))]
    child, position = interleave([len(s) for s in per_source], mode, stopping, weights, seed)
    starts = np.concatenate(([0], np.cumsum([len(s) for s in per_source])))
    flat = np.concatenate(per_source) if per_source else np.zeros(0, dtype=np.int64)
    return flat[starts[child] + position]


def virtual_ranks(setting: int | str, items: int) -> int:
    """The number of virtual ranks for `items` served items: `auto`'s choice, or the configured count, which
    must not exceed the items (every virtual rank reads at least one); ValueError otherwise."""
    if setting == "auto":
        return max(v for v in AUTO_VIRTUAL if v == 1 or v <= items // ITEMS_PER_VIRTUAL)
    count = int(setting)
    if items and count > items:
        raise ValueError(f"dataset.virtual_ranks is {count}, but the dataset serves only {items} items per epoch: "
                         f"every virtual rank needs one; set virtual_ranks to at most {items} (or `auto`)")
    return count


def digit_reversal(count: int) -> np.ndarray:
    """rho: v -> the region virtual rank v reads. v's digits in the mixed radix of count's ascending prime
    factors (least significant first) read in reverse order; so the v with v mod w = r, for w a prefix product of
    the factors, are one contiguous run of regions."""
    v = np.arange(count, dtype=np.int64)
    rho = np.zeros(count, dtype=np.int64)
    for p in prime_factors(count):
        rho = rho * p + v % p
        v //= p
    return rho


@dataclass(frozen=True)
class EpochLayout:
    """One epoch's items in region order, where each region starts, and which region each virtual rank reads."""

    items: np.ndarray  # store sample indices, region after region (one int64 per served item)
    cum: np.ndarray  # tokens before each item in `items` order (len(items) + 1 entries)
    bounds: np.ndarray  # region q is items[bounds[q]:bounds[q + 1]]
    region: np.ndarray  # region[v]: the region virtual rank v reads

    @property
    def virtual(self) -> int:
        """V, the number of virtual ranks."""
        return len(self.region)

    def counts(self) -> np.ndarray:
        """Items per virtual rank."""
        return np.diff(self.bounds)[self.region]

    def tokens(self) -> np.ndarray:
        """Tokens per virtual rank (its stream's length, EOS included)."""
        return np.diff(self.cum[self.bounds])[self.region]


def epoch_layout(store: TokenStore, sequence: np.ndarray, *, virtual: int, seed: int | None, epoch: int,
                 window_shards: int, pack: bool = True) -> EpochLayout:
    """The epoch's layout of the served sequence over `virtual` virtual ranks (see the module's docstring); its
    regions balanced by tokens for packed rows (`pack`), by items for padded rows (one sample each)."""
    if len(sequence) and virtual > len(sequence):
        raise ValueError(f"virtual_ranks {virtual} exceeds the {len(sequence)} served items")
    items = sequence
    rng = np.random.default_rng([seed, epoch]) if seed is not None else None
    shard_at = None
    if rng is not None:
        at = np.empty(len(store.manifest.shards), dtype=np.int64)
        at[rng.permutation(len(at))] = np.arange(len(at))
        shard_at = at[store.shard[sequence]]
        by_shard = np.argsort(shard_at, kind="stable")
        items, shard_at = sequence[by_shard], shard_at[by_shard]
        del by_shard
    region = digit_reversal(virtual)
    bounds = _regions(store.lengths[items], virtual) if pack else block_bounds(len(items), region)
    if rng is not None and shard_at is not None:
        group = np.repeat(np.arange(virtual, dtype=np.int64), np.diff(bounds))
        window = shard_at // window_shards
        if pack and len(items):  # a region's first and last shards: groups of their own at its ends (docstring)
            window = np.where(shard_at == shard_at[bounds[:-1]][group], -1,
                              np.where(shard_at == shard_at[bounds[1:] - 1][group], len(at), window))
        shuffled = np.lexsort((rng.random(len(items)), window, group))
        items = items[shuffled]
    cum = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(store.lengths[items], out=cum[1:])
    return EpochLayout(items, cum, bounds, region)


def block_bounds(rows: int, region: np.ndarray) -> np.ndarray:
    """The bounds of `blocks`, in region order (len(region) + 1 entries)."""
    first = blocks(rows, region)[0]
    return np.concatenate((first[np.argsort(region)], [rows])).astype(np.int64)


def _regions(lengths: np.ndarray, count: int) -> np.ndarray:
    """Bounds of `count` contiguous non-empty regions of items of these sizes (tokens, or 1 per item), cut at the
    item nearest to each quantile of the sizes (count + 1 entries; all empty when there are no items)."""
    n = len(lengths)
    if n == 0:
        return np.zeros(count + 1, dtype=np.int64)
    middles = np.cumsum(lengths, dtype=np.float64) - lengths / 2  # an item goes where its middle token falls
    q = np.arange(1, count, dtype=np.int64)
    cuts = np.searchsorted(middles, q * (float(middles[-1] + lengths[-1] / 2) / count))
    slack = np.clip(np.maximum.accumulate(np.maximum(cuts - q, 0)), 0, n - count)  # strictly rising, non-empty
    return np.concatenate(([0], slack + q, [n])).astype(np.int64)


def blocks(rows: int, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An epoch's `rows` stream rows (region after region) dealt to V = len(region) virtual ranks in contiguous
    blocks: per virtual rank v, its block's first row and its rows, rows // V each and one more for v < rows mod
    V, the blocks laid out in region order (v's is the region[v]-th). So row i of virtual rank v is the epoch's
    global row i * V + v, and the global rows are 0 .. rows - 1 with none missing."""
    count = len(region)
    sizes = rows // count + (np.arange(count) < rows % count)
    in_order = np.zeros(count + 1, dtype=np.int64)
    in_order[1:][region] = sizes
    return np.cumsum(in_order)[:-1][region], sizes


def rank_regions(virtual: int, world: int) -> list[np.ndarray]:
    """The regions each rank of `world` reads over an epoch (of at least `virtual` rows, from position 0) of a
    layout of `virtual` virtual ranks, ascending: rank r takes the rows of one residue class c mod w (the deal's),
    so the virtual ranks v with v = c mod gcd(w, V), and their regions."""
    region, g = digit_reversal(virtual), np.gcd(world, virtual)
    out = []
    for rank in range(world):
        residue = Deal(rank, world, 1, virtual).residue
        c = rank if residue is None else residue
        out.append(np.sort(region[np.arange(c % g, virtual, g)]))
    return out


def node_regions(virtual: int, world: int, local: int) -> list[np.ndarray]:
    """The regions each node reads, its ranks numbered as torchrun does (node k: ranks local*k .. local*k +
    local - 1); `local` must divide `world`."""
    ranks = rank_regions(virtual, world)
    return [np.unique(np.concatenate(ranks[k * local:(k + 1) * local])) for k in range(world // local)]


def runs(regions: np.ndarray) -> int:
    """The number of contiguous runs in ascending, distinct regions."""
    return int(len(regions) and 1 + np.count_nonzero(np.diff(regions) > 1))
