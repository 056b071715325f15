"""A token store's arrays in memory for cached-mode unit tests, and a sample-by-sample reference of an epoch's rows."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np

from sigil_feed.server.cached.layout import EpochLayout, epoch_layout
from sigil_feed.server.cached.packer import CachedPacker, CachedState
from sigil_feed.server.rows.batch import Rows
from sigil_feed.server.rows.deal import Deal
from sigil_feed.server.rows.spans import MaskedSpans

PAD = 0


class Shards:
    """Shard token arrays behind the ShardMaps interface, recording which shards each batch pinned."""

    local = True

    def __init__(self, tokens: list[np.ndarray]) -> None:
        self.tokens, self.pinned_log = tokens, []

    @contextmanager
    def pinned(self, indices: list[int]) -> Iterator[dict[int, np.ndarray]]:
        self.pinned_log.append(list(indices))
        yield {i: self.tokens[i] for i in indices}


def fake_store(lengths: list[int], per_shard: int, prompts: list[int] | None = None,
               later: list[list[int]] | None = None) -> Any:
    """A store of samples with these lengths, `per_shard` consecutive samples per shard (one source file each);
    every token id is unique (1, 2, 3, ...), so each token is traceable. `prompts`: each sample's masked prefix,
    `later`: its further masked ranges (flat [start, end) pairs, as a conversation's turns)."""
    lengths_a = np.array(lengths, dtype=np.int64)
    shard = np.arange(len(lengths)) // per_shard
    starts = np.cumsum(lengths_a) - lengths_a
    ids = np.arange(1, int(lengths_a.sum()) + 1, dtype=np.int32)
    count = int(shard.max(initial=-1)) + 1
    first = np.searchsorted(shard, np.arange(count + 1))
    base = np.concatenate((starts, [lengths_a.sum()]))[first]
    tokens = [ids[base[k]:base[k + 1]] for k in range(count)]
    return SimpleNamespace(shard=shard, offsets=starts - base[shard], lengths=lengths_a,
                           prompt_tokens=np.array(prompts or [0] * len(lengths), dtype=np.int64),
                           masked=MaskedSpans.join_prefix(np.array(prompts or [0] * len(lengths)),
                                                          MaskedSpans.of(later or [[]] * len(lengths))),
                           source=np.zeros(len(lengths), dtype=np.int64), file=shard.copy(),
                           manifest=SimpleNamespace(dtype="<i4", shards=[None] * count), shards=Shards(tokens),
                           ids=[ids[s:s + n] for s, n in zip(starts.tolist(), lengths, strict=True)])


def layout_of(store: Any, virtual: int, seed: int | None = 7, epoch: int = 0, window: int = 2,
              sequence: np.ndarray | None = None, pack: bool = True) -> EpochLayout:
    """The epoch layout of the store's samples (served sequence: store order unless given), for packed rows or
    padded ones (`pack`)."""
    served = np.arange(len(store.lengths)) if sequence is None else sequence
    return epoch_layout(store, served, virtual=virtual, seed=seed, epoch=epoch, window_shards=window, pack=pack)


def packer(store: Any, layout: EpochLayout, rank: int, world: int, batch: int, seq: int, pack: bool,
           remainder: str, completion: bool = False) -> CachedPacker:
    return CachedPacker(store, layout, Deal(rank, world, batch, layout.virtual), seq_len=seq, pack=pack,
                        completion_only=completion, pad_id=PAD, remainder=remainder)


def row_content(rows: Rows, j: int) -> tuple[tuple[int, ...], ...]:
    """Row j of a batch as its segments' token ids (packed) or its real tokens (padded), plus its loss mask."""
    ids = rows.input_ids[j]
    if rows.row_segments is None:
        segments = [ids[:int(rows.lengths[j])].tolist()]
    else:
        first = int(rows.row_segments[:j].sum())
        cuts = np.cumsum(rows.lengths[first:first + int(rows.row_segments[j])])
        segments = [part.tolist() for part in np.split(ids[:int(cuts[-1])], cuts[:-1])]
        assert (ids[int(cuts[-1]):] == PAD).all()
    mask = () if rows.loss_mask is None else tuple(rows.loss_mask[j][:sum(map(len, segments))].tolist())
    return (*map(tuple, segments), mask)


def run(store: Any, layout: EpochLayout, world: int, batch: int, seq: int, pack: bool, remainder: str, *,
        start: int = 0, steps: int | None = None, completion: bool = False) -> tuple[dict[int, Any], int]:
    """Every rank of a layout from global row `start`, `steps` steps (or to the epoch's end): the rows each
    delivered by global row, and the position after."""
    packers = [packer(store, layout, r, world, batch, seq, pack, remainder, completion) for r in range(world)]
    for p in packers:
        p.set_state(CachedState(row=start, virtual=layout.virtual))
    got: dict[int, Any] = {}
    step = 0
    while steps is None or step < steps:
        at = packers[0].row
        batches = [p.next_batch() for p in packers]
        if all(b is None for b in batches):
            break
        for p, rows in zip(packers, batches, strict=True):  # the deal's rows, ascending (keep: a prefix of them)
            count = 0 if rows is None else rows.input_ids.shape[0]
            dealt = p.deal.rows(at, count).tolist()
            for j in range(count):
                assert dealt[j] not in got
                got[dealt[j]] = row_content(rows, j)
        step += 1
        assert len({p.row for p, b in zip(packers, batches, strict=True) if b is not None}) == 1
    return got, packers[0].row


def digest(rows: dict[int, Any]) -> str:
    """A hash of rows in global row order."""
    return hashlib.sha256(repr(sorted(rows.items())).encode()).hexdigest()


def reference(store: Any, layout: EpochLayout, seq: int, pack: bool, remainder: str, completion: bool = False,
              past: int = 0) -> tuple[list[Any], int]:
    """The epoch's global rows, built token by token from the definition (not from the packer's arithmetic), and
    their number. The layout's items in order are one stream, cut into rows (packed: every `seq` tokens, the last
    row partial; padded: one item each, truncated); its rows are dealt to the V virtual ranks in contiguous
    blocks laid out in region order, rows // V each and one more for virtual ranks v < rows mod V; global row e
    is row e // V of virtual rank e mod V. `pad` (with `past` rows past the end): a virtual rank's block of
    tokens (or items) wraps around to its start, which completes the partial last row and gives the rows past
    the end; with fewer rows than V, rows past the end are the epoch's first rows again."""
    items = layout.items.tolist()
    if pack:
        units = [(s, k) for s in items for k in range(len(store.ids[s]))]
        total = -(-len(units) // seq)
    else:
        units, total = [(s, -1) for s in items], len(items)
    virtual = layout.virtual
    sizes = [total // virtual + (v < total % virtual) for v in range(virtual)]
    block: list[list[tuple[int, int]]] = [[] for _ in range(virtual)]
    at = 0
    for v in sorted(range(virtual), key=lambda v: int(layout.region[v])):  # blocks in region order
        step = seq if pack else 1
        block[v], at = units[at * step:(at + sizes[v]) * step], at + sizes[v]

    def row(e: int) -> Any:
        if remainder == "pad" and e >= total and total < virtual:
            e %= total
        v, i = e % virtual, e // virtual
        own = block[v]
        if not pack:
            s = own[i % len(own)][0] if remainder == "pad" else own[i][0]
            return (tuple(store.ids[s][:seq].tolist()), mask([(s, k) for k in range(min(seq, len(store.ids[s])))]))
        span = range(i * seq, (i + 1) * seq) if remainder == "pad" else range(i * seq, min((i + 1) * seq, len(own)))
        pairs = [own[x % len(own)] for x in span]
        segments: list[list[int]] = []
        for n, (s, k) in enumerate(pairs):
            if n == 0 or (s, k - 1) != pairs[n - 1] or span[n] % len(own) == 0:
                segments.append([])
            segments[-1].append(int(store.ids[s][k]))
        return (*map(tuple, segments), mask(pairs))

    def mask(pairs: list[tuple[int, int]]) -> tuple[int, ...]:
        return tuple(int(not any(a <= k < b for a, b in store.masked.sample(s).tolist()))
                     for s, k in pairs) if completion else ()

    return [row(e) for e in range(total + (past if remainder == "pad" else 0))], total
