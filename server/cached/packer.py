"""Cached-mode batches: one rank's share of an epoch's global rows, cut from the memory map with vectorised numpy.

The epoch's items, in the layout's order (region after region), are one stream: packed, their tokens (EOS
included) concatenated and cut into rows of seq_len tokens, the last one partial (a real row, padded within
the row); padded, one item per row, truncated to seq_len. The stream's rows are dealt to the V virtual ranks in
contiguous blocks of equally many rows (one more for the first ones; order.blocks), laid out in region order,
so that global row e is row e // V of virtual rank e mod V for every row of the epoch: the global rows are
every row exactly once, and no virtual rank runs out before the others. A sample may continue from the last
row of one block into the first of the next, at the exact token, as across any two rows.

`remainder` is applied once, by the deal (server/rows/deal.py), to that one sequence, as in streaming mode: `pad`
completes the last window with the rows past the end of their virtual ranks' blocks, which wrap around to the
blocks' starts (the epoch's start, per virtual rank: a rank stays in its own shards; this also completes the
partial last row), `drop` skips the last partial window, `keep` sends it ragged. So an epoch repeats or skips
fewer than one step's rows (`world_size * batch_size`), whatever V, the lengths and the regions' balance.

An epoch under more than one mixture is segments of global rows (segments.py), each laid out on its own: the
packer cuts each row of a window from the segment it falls in, so a window across a segment's start takes its
rows before it from the one before, whatever the world size. `pad` wraps within the segment the epoch ends in.

The state is the global row where the next window starts, which resumes every rank of any layout. The shards
a batch reads are pinned while it is cut (a remote store's are fetched into the shard cache), and the shards of
this rank's next windows are fetched ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Annotated

import numpy as np
from pydantic import Field, StrictInt

from ..pipeline.stage import Count, Stage, StageState
from ..rows.batch import Rows, joined
from ..rows.deal import Deal
from ..rows.spans import loss_mask
from ..store.reader import TokenStore
from .layout import EpochLayout, blocks


class CachedState(StageState):
    """A cached-mode position: the global row of the next window, and the epoch's number of virtual ranks."""

    row: Count
    virtual: Annotated[StrictInt, Field(ge=1, lt=1 << 32)]


AHEAD_BATCHES = 2
"""Prefetch the shards of this rank's batches in this many windows past the current one."""


class CachedPacker(Stage[Rows, CachedState]):
    """One rank's batches for one epoch of a token store's layout (and the epoch's later segments, `later`: each
    one's first global row, layout and store, another one after a source list changed inside the epoch)."""

    def __init__(self, store: TokenStore, layout: EpochLayout, deal: Deal, *, seq_len: int, pack: bool,
                 completion_only: bool, pad_id: int, remainder: str, offset: int = 0,
                 later: Sequence[tuple[int, EpochLayout, TokenStore]] = ()) -> None:
        self.store, self.layout, self.deal = store, layout, deal
        self.seq_len, self.pack, self.completion_only, self.pad_id = seq_len, pack, completion_only, pad_id
        self.remainder = remainder
        self.dtype = np.dtype(store.manifest.dtype)
        self.units = int(layout.cum[-1]) if pack else len(layout.items)  # the stream's tokens, or items
        self.local = -(-self.units // seq_len) if pack else self.units  # the layout's rows
        self.offset = offset  # the epoch's global row of the layout's row 0 (an epoch's later segment: segments.py)
        self.total = offset + self.local  # the epoch's rows
        self.first, self.rows = blocks(self.local, layout.region)  # per virtual rank: its block's first row, rows
        self.row = offset
        self.later: list[CachedPacker] = []  # each cuts the rows from its offset on
        for start, part, part_store in later:
            if start >= self.total:  # the segment before ended the epoch
                break
            self.total = start
            if not len(part.items):  # nothing left to lay out: the epoch ends where the segment would start
                break
            self.later.append(CachedPacker(part_store, part, deal, seq_len=seq_len, pack=pack, pad_id=pad_id,
                                           completion_only=completion_only, remainder=remainder, offset=start))
            self.total = self.later[-1].total

    @property
    def virtual(self) -> int:
        """V, the layout's virtual ranks."""
        return self.layout.virtual

    @property
    def never_blocks(self) -> bool:
        """Whether cutting a batch only reads memory maps (a local store; a remote one may wait for a fetch)."""
        return self.store.shards.local

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows -> (virtual rank, row of its block). `pad`'s rows past the epoch's end are rows past the
        end of their virtual rank's block, which wrap around to its start (see `_runs`), or, when the epoch
        has fewer rows than V, the epoch's first rows again."""
        e = rows - self.offset
        if self.remainder == "pad" and self.local < self.virtual:
            e %= max(self.local, 1)
        return e % self.virtual, e // self.virtual

    def next_batch(self) -> Rows | None:
        """This rank's batch of the window at `row`, or None when the epoch has ended for this rank."""
        rows = self.deal.batch(self.row, self.total, self.remainder)
        if not len(rows):
            if len(replace(self.deal, rank=0).batch(self.row, self.total, self.remainder)):
                self.row += self.deal.window  # `keep`'s ragged last window has no row for this rank: it is over
            return None
        self.row += self.deal.window
        cut = [segment._cut(part) for segment, part in self._segments(rows)]
        batch, shards = joined([c[0] for c in cut]), np.concatenate([c[1] for c in cut])
        self._prefetch(shards)
        return batch

    def _segments(self, rows: np.ndarray) -> list[tuple[CachedPacker, np.ndarray]]:
        """Ascending global rows by the segment each falls in (rows past the epoch's end: the last one's)."""
        if not self.later:
            return [(self, rows)]
        parts = [self, *self.later]
        where = np.searchsorted([p.offset for p in self.later], rows, side="right")
        return [(parts[k], rows[where == k]) for k in np.unique(where).tolist()]

    def _cut(self, rows: np.ndarray) -> tuple[Rows, np.ndarray]:
        """This segment's rows, and the shard of each run of tokens they read."""
        v, i = self._locate(rows)
        return self._packed(v, i) if self.pack else self._padded(v, i)

    def _shards(self, rows: np.ndarray) -> np.ndarray:
        """The shards this segment's rows read, in order."""
        v, i = self._locate(rows)
        items = self._runs(v, i)[1] if self.pack else self.first[v] + i % self.rows[v]
        return self.store.shard[self.layout.items[items]]

    def _runs(self, v: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The rows' tokens as runs of one item each, in row-major order: (row of the batch, item in
        layout.items, offset into the item, length). Row i of virtual rank v is tokens [i * seq_len,
        (i + 1) * seq_len) of its block's tokens; they stop at the block's end (the epoch's partial last row),
        or under `pad` wrap around to the block's start (completing that row, and the rows past the end)."""
        cum, seq = self.layout.cum, self.seq_len
        base = self.first[v] * seq
        size = np.minimum((self.first[v] + self.rows[v]) * seq, self.units) - base  # the block's tokens
        lo, hi = i * seq, (i + 1) * seq
        if self.remainder != "pad":
            hi = np.minimum(hi, size)
        whole = hi <= size
        piece_row, piece_lo, piece_hi = [np.flatnonzero(whole)], [(base + lo)[whole]], [(base + hi)[whole]]
        for row in np.flatnonzero(~whole).tolist():  # `pad` only: wrap around the block, perhaps more than once
            at, x, left = int(base[row]), int(lo[row] % size[row]), seq
            while left > 0:
                take = min(left, int(size[row]) - x)
                piece_row.append(np.array([row]))
                piece_lo.append(np.array([at + x]))
                piece_hi.append(np.array([at + x + take]))
                left, x = left - take, 0
        rank = np.concatenate(piece_row)
        order = np.argsort(rank, kind="stable")
        rank, p_lo, p_hi = rank[order], np.concatenate(piece_lo)[order], np.concatenate(piece_hi)[order]
        first = np.searchsorted(cum, p_lo, side="right") - 1
        per_piece = np.searchsorted(cum, p_hi - 1, side="right") - first
        item = np.repeat(first, per_piece) + np.arange(per_piece.sum()) - np.repeat(np.cumsum(per_piece) - per_piece,
                                                                                    per_piece)
        run_lo = np.maximum(cum[item], np.repeat(p_lo, per_piece))
        count = np.minimum(cum[item + 1], np.repeat(p_hi, per_piece)) - run_lo
        return np.repeat(rank, per_piece), item, run_lo - cum[item], count

    def _packed(self, v: np.ndarray, i: np.ndarray) -> tuple[Rows, np.ndarray]:
        row, item, offset, count = self._runs(v, i)
        sample = self.layout.items[item]
        shard = self.store.shard[sample]
        starts = (self.store.offsets[sample] + offset).tolist()
        real = np.empty(int(count.sum()), dtype=self.dtype)
        with self.store.shards.pinned(np.unique(shard).tolist()) as tokens:
            np.concatenate([tokens[s][a:a + c] for s, a, c in zip(shard.tolist(), starts, count.tolist(), strict=True)],
                           out=real)
        filled = np.bincount(row, weights=count, minlength=len(v)).astype(np.int64)
        ids = _as_rows(real, filled, self.seq_len, self.pad_id)
        mask = None
        if self.completion_only:
            mask = _as_rows(loss_mask(self.store.masked, sample, offset, count).astype(np.uint8, copy=False), filled,
                            self.seq_len, 1)
        segments = np.bincount(row, minlength=len(v)).astype(np.int32)
        return Rows(ids, count.astype(np.int32), segments, mask, len(real)), shard

    def _padded(self, v: np.ndarray, i: np.ndarray) -> tuple[Rows, np.ndarray]:
        sample = self.layout.items[self.first[v] + i % self.rows[v]]  # `pad`: past its block, its first rows
        kept = np.minimum(self.store.lengths[sample], self.seq_len)
        shard = self.store.shard[sample]
        ids = np.full((len(v), self.seq_len), self.pad_id, dtype=self.dtype)
        with self.store.shards.pinned(np.unique(shard).tolist()) as tokens:
            for row, (s, start, count) in enumerate(zip(shard.tolist(), self.store.offsets[sample].tolist(),
                                                        kept.tolist(), strict=True)):
                ids[row, :count] = tokens[s][start:start + count]
        mask = None
        if self.completion_only:
            mask = np.ones((len(v), self.seq_len), dtype=np.uint8)
            mask[np.arange(self.seq_len)[None, :] < kept[:, None]] = loss_mask(
                self.store.masked, sample, np.zeros(len(sample), dtype=np.int64), kept)
        return Rows(ids, kept.astype(np.int32), None, mask, int(kept.sum())), shard

    def _prefetch(self, current: np.ndarray) -> None:
        """Ask a remote store's cache for the shards of this rank's next AHEAD_BATCHES windows that the batch just
        cut did not read, in the order they are needed."""
        if self.store.shards.local:
            return
        window = self.deal.window
        rows = np.concatenate([self.deal.batch(self.row + k * window, self.total, self.remainder)
                               for k in range(AHEAD_BATCHES)])
        if not len(rows):
            return
        upcoming = np.concatenate([segment._shards(part) for segment, part in self._segments(rows)])
        self.store.shards.prefetch(upcoming[~np.isin(upcoming, current)])

    @property
    def ended(self) -> bool:
        """Whether no window of the epoch is left for any rank (every rank's next batch is None)."""
        if self.remainder == "drop":  # only whole windows
            return self.row + self.deal.window > self.total
        return self.row >= self.total

    def get_state(self) -> CachedState:
        """The global row where the next window starts, and V."""
        return CachedState(row=self.row, virtual=self.virtual)

    def set_state(self, state: CachedState) -> None:
        """Continue at a saved position; ValueError for a position of another number of virtual ranks."""
        if state.virtual != self.virtual:
            raise ValueError(f"the position was taken with {state.virtual} virtual ranks, but this dataset has "
                             f"{self.virtual} (dataset.virtual_ranks must stay the same for the life of a run)")
        if state.row < self.offset:
            raise ValueError(f"row {state.row} is before the segment its plan starts at row {self.offset}")
        self.row = state.row

    def __next__(self) -> Rows:
        """This rank's next batch (see next_batch)."""
        rows = self.next_batch()
        if rows is None:
            raise StopIteration
        return rows


def _as_rows(tokens: np.ndarray, filled: np.ndarray, seq_len: int, fill: int) -> np.ndarray:
    """Tokens laid end to end as rows of `seq_len`, row r holding the next `filled[r]` of them and then `fill` (a
    partial row's padding comes last). When every row is full (all but an epoch's last ones) that is `tokens`
    itself, reshaped: no fill, mask and masked copy, three passes over a batch that can be 128 MB."""
    if (filled == seq_len).all():
        return tokens.reshape(len(filled), seq_len)
    rows = np.full((len(filled), seq_len), fill, dtype=tokens.dtype)
    rows[np.arange(seq_len)[None, :] < filled[:, None]] = tokens
    return rows
