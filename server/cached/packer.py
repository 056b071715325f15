"""Cached-mode batches: one rank's share of an epoch's global rows, cut from the memory map with vectorised numpy.

Each virtual rank v of the epoch layout reads its region as one token stream (items concatenated, EOS
included). Packed, its row i is tokens [i * seq_len, (i + 1) * seq_len) of that stream; padded, its row i is
its item i truncated to seq_len. Global row e is row e // V of virtual rank e mod V. The epoch's rows follow
`remainder`: `pad` gives every virtual rank the most rows any has (a virtual rank's rows past its stream's end,
and the missing tail of its partial last row, wrap around to its stream's start), `drop` the fewest whole rows
any has, `keep` every row there is (those past the fewest in global row order, the last ones partial). The
deal (server/rows/deal.py) says which global rows are this rank's batch; the state is the global row where the next
window starts, which resumes every rank of any layout. The shards a batch reads are pinned while it is cut (a
remote store's are fetched into the shard cache), and the shards of this rank's next windows are fetched ahead.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field, StrictInt

from ..pipeline.stage import Count, Stage, StageState
from ..rows.deal import Deal
from ..store.reader import TokenStore
from ..streaming.packer import Rows
from .layout import EpochLayout


class CachedState(StageState):
    """A cached-mode position: the global row of the next window, and the epoch's number of virtual ranks."""

    row: Count
    virtual: Annotated[StrictInt, Field(ge=1, lt=1 << 32)]


AHEAD_BATCHES = 2
"""Prefetch the shards of this rank's batches in this many windows past the current one."""


def epoch_rows(rows: np.ndarray, whole: np.ndarray, remainder: str) -> tuple[int, np.ndarray, int]:
    """The epoch's global rows from each virtual rank's row count (`rows`) and whole rows (`whole`): the rows
    in direct order (e < D is row e // V of virtual rank e mod V), the rows after them in order (`keep`: the
    rows past the fewest), and the total."""
    count = len(rows)  # V >= 1
    if remainder == "pad":
        direct = int(rows.max()) * count
    elif remainder == "drop":
        direct = int(whole.min()) * count
    else:
        direct = int(rows.min()) * count
    if remainder != "keep":
        return direct, np.zeros(0, dtype=np.int64), direct
    extra = rows - direct // count
    owner = np.repeat(np.arange(count, dtype=np.int64), extra)
    step = np.arange(len(owner)) - np.repeat(np.cumsum(extra) - extra, extra)
    tail = np.sort(direct + step * count + owner)
    return direct, tail, direct + len(tail)


class CachedPacker(Stage[Rows, CachedState]):
    """One rank's batches for one epoch of a token store's layout."""

    def __init__(self, store: TokenStore, layout: EpochLayout, deal: Deal, *, seq_len: int, pack: bool,
                 completion_only: bool, pad_id: int, remainder: str) -> None:
        self.store, self.layout, self.deal = store, layout, deal
        self.seq_len, self.pack, self.completion_only, self.pad_id = seq_len, pack, completion_only, pad_id
        self.remainder = remainder
        self.dtype = np.dtype(store.manifest.dtype)
        self.first = layout.bounds[layout.region]  # per virtual rank: its first item in layout.items
        self.units = layout.tokens() if pack else layout.counts()  # per virtual rank: its stream's length
        rows = -(-self.units // seq_len) if pack else self.units
        whole = self.units // seq_len if pack else self.units
        self.direct, self.tail, self.total = epoch_rows(rows, whole, remainder)
        self.row = 0

    @property
    def virtual(self) -> int:
        """V, the layout's virtual ranks."""
        return self.layout.virtual

    @property
    def never_blocks(self) -> bool:
        """Whether cutting a batch only reads memory maps (a local store; a remote one may wait for a fetch)."""
        return self.store.shards.local

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows -> (virtual rank, row of its stream)."""
        if self.remainder == "pad":
            e = rows % self.total
        else:
            e = rows.copy()
            beyond = e >= self.direct
            e[beyond] = self.tail[e[beyond] - self.direct]
        return e % self.virtual, e // self.virtual

    def next_batch(self) -> Rows | None:
        """This rank's batch of the window at `row`, or None when the epoch has ended for this rank."""
        rows = self.deal.batch(self.row, self.total, self.remainder)
        if not len(rows):
            return None
        self.row += self.deal.window
        v, i = self._locate(rows)
        batch, shards = self._packed(v, i) if self.pack else self._padded(v, i)
        self._prefetch(shards)
        return batch

    def _runs(self, v: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The rows' tokens as runs of one item each, in row-major order: (row, item in layout.items, offset
        into the item, length). A row's stream span wraps around its stream (`pad`) or stops at its end."""
        length = self.units[v]
        lo, hi = i * self.seq_len, (i + 1) * self.seq_len
        if self.remainder != "pad":
            hi = np.minimum(hi, length)
        base = self.layout.cum[self.first[v]]
        piece_row, piece_lo, piece_hi = [], [], []
        for row, (start, stop, size, at) in enumerate(zip(lo.tolist(), hi.tolist(), length.tolist(), base.tolist(),
                                                          strict=True)):
            x, left = start % size, stop - start
            while left > 0:  # more than one piece only where a `pad` row wraps around its stream
                take = min(left, size - x)
                piece_row.append(row)
                piece_lo.append(at + x)
                piece_hi.append(at + x + take)
                left, x = left - take, 0
        cum = self.layout.cum
        p_lo, p_hi = np.array(piece_lo, dtype=np.int64), np.array(piece_hi, dtype=np.int64)
        first = np.searchsorted(cum, p_lo, side="right") - 1
        per_piece = np.searchsorted(cum, p_hi - 1, side="right") - first
        item = np.repeat(first, per_piece) + np.arange(per_piece.sum()) - np.repeat(np.cumsum(per_piece) - per_piece,
                                                                                    per_piece)
        run_lo = np.maximum(cum[item], np.repeat(p_lo, per_piece))
        count = np.minimum(cum[item + 1], np.repeat(p_hi, per_piece)) - run_lo
        return np.repeat(np.array(piece_row, dtype=np.int64), per_piece), item, run_lo - cum[item], count

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
        where = np.arange(self.seq_len)[None, :] < filled[:, None]  # a partial row's padding comes last
        ids = np.full((len(v), self.seq_len), self.pad_id, dtype=self.dtype)
        ids[where] = real
        mask = None
        if self.completion_only:
            run_start = np.cumsum(count) - count
            within = np.arange(len(real)) - np.repeat(run_start - offset, count)
            mask = np.ones((len(v), self.seq_len), dtype=np.uint8)
            mask[where] = within >= np.repeat(self.store.prompt_tokens[sample], count)
        segments = np.bincount(row, minlength=len(v)).astype(np.int32)
        return Rows(ids, count.astype(np.int32), segments, mask, len(real)), shard

    def _padded(self, v: np.ndarray, i: np.ndarray) -> tuple[Rows, np.ndarray]:
        sample = self.layout.items[self.first[v] + i % self.units[v]]
        kept = np.minimum(self.store.lengths[sample], self.seq_len)
        shard = self.store.shard[sample]
        ids = np.full((len(v), self.seq_len), self.pad_id, dtype=self.dtype)
        with self.store.shards.pinned(np.unique(shard).tolist()) as tokens:
            for row, (s, start, count) in enumerate(zip(shard.tolist(), self.store.offsets[sample].tolist(),
                                                        kept.tolist(), strict=True)):
                ids[row, :count] = tokens[s][start:start + count]
        mask = None
        if self.completion_only:
            mask = (np.arange(self.seq_len)[None, :] >= self.store.prompt_tokens[sample][:, None]).astype(np.uint8)
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
        v, i = self._locate(rows)
        items = self._runs(v, i)[1] if self.pack else self.first[v] + i % self.units[v]
        upcoming = self.store.shard[self.layout.items[items]]
        self.store.shards.prefetch(upcoming[~np.isin(upcoming, current)])

    def get_state(self) -> CachedState:
        """The global row where the next window starts, and V."""
        return CachedState(row=self.row, virtual=self.virtual)

    def set_state(self, state: CachedState) -> None:
        """Continue at a saved position; ValueError for a position of another number of virtual ranks."""
        if state.virtual != self.virtual:
            raise ValueError(f"the position was taken with {state.virtual} virtual ranks, but this dataset has "
                             f"{self.virtual} (dataset.virtual_ranks must stay the same for the life of a run)")
        self.row = state.row

    def __next__(self) -> Rows:
        """This rank's next batch (see next_batch)."""
        rows = self.next_batch()
        if rows is None:
            raise StopIteration
        return rows
