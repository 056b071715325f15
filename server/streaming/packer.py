"""Build `[batch, seq_len]` batches of the epoch's global rows (streaming mode): packed rows or padded rows.

The epoch's global rows are cut from the one stream of the epoch's encoded samples (blocks.py), the same for
every rank and layout. Packed: the samples (each ending in EOS) are concatenated and cut into rows of exactly
seq_len tokens; a sample may continue into the next row, and the epoch's last row may be partial. The batch
carries segment lengths, from which the client derives position_ids that restart at every segment. Padded:
one sample per row, truncated to seq_len. Every rank cuts the whole stream but copies only the rows it owns
(`Deal`): the others are skipped by moving the position, no token is copied. The state, at a window
boundary, is the global row P where the next window starts, the order's state of the sample that row starts
in and the tokens of it in earlier rows, and how often the stream wrapped to the epoch's start: any rank's
state at P resumes any rank of any layout.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..pipeline.stage import Count, Stage, StageState
from ..rows.batch import Rows
from ..rows.deal import Deal
from .block_order import OrderState
from .encoding import TokenStream, TokenStreamState

ENDLESS = 1 << 62
"""The epoch's rows while its end is not known (more than any window reaches)."""


class StreamState(StageState):
    """A streaming position: the global row of the next window, the order's state of the sample that row starts
    in and its tokens in earlier rows (the token stream's state), and the epoch's wraps so far."""

    row: Count
    at: OrderState
    offset: Count
    wraps: Count


class Packer(Stage[Rows, StreamState]):
    """One rank's batches of the epoch's global rows: the rows `deal` gives it of each window, cut from `stream`.

    The end of the epoch follows `Deal.batch` with the epoch's rows, known once the stream ends (every rank
    cuts the same stream, so all agree): `pad` completes a window that started inside the epoch by wrapping
    to the epoch's start, `drop` drops a partial last window (a partial last row is a row: it is sent, padded
    within the row, when its window is whole), `keep` sends a ragged last window. Either way fewer than one
    window's rows are repeated or lost.
    """

    def __init__(self, stream: TokenStream, deal: Deal, *, seq_len: int, pack: bool, completion_only: bool,
                 pad_id: int, remainder: str = "keep") -> None:
        self.stream, self.deal, self.seq_len, self.pack = stream, deal, seq_len, pack
        self.completion_only, self.pad_id, self.remainder = completion_only, pad_id, remainder
        self.unit = seq_len if pack else 1  # stream units (tokens, or samples) per row
        self.row = 0  # P: the global row where the next window starts
        self.at = 0  # the stream's position in units from the epoch's start, wraps included
        self.wraps = 0  # times the stream went back to the epoch's start
        self.end: int | None = None  # units in the epoch, once the stream ended
        self.held: tuple[OrderState, int] | None = None  # the position at `row` once the stream passed it for nothing

    def _total(self) -> int:
        """The epoch's global rows (a partial last row included), or ENDLESS while its end is not known."""
        if self.end is None:
            return ENDLESS
        return -(-self.end // self.unit)

    def _ended(self) -> None:
        """The stream ran out at `at`."""
        if self.wraps == 0:
            self.end = self.at

    def _wrap(self, wrap: bool) -> bool:
        """At the epoch's end: go on from its start if `wrap` (and the epoch is not empty)."""
        self._ended()
        if not (wrap and self.end):
            return False
        self.stream.restart()
        self.wraps += 1
        return True

    def _skip(self, n: int, wrap: bool) -> bool:
        """Pass `n` units; False if the epoch ended first (and may not wrap)."""
        while n > 0:
            step = self.stream.skip_tokens(n) if self.pack else self.stream.skip_samples(n)
            self.at += step
            n -= step
            if n and not self._wrap(wrap):
                return False
        return True

    def next_batch(self) -> Rows | None:
        """This rank's rows of the window at `row`, or None: the epoch ended for this rank."""
        start, rows = self.row, self.deal.rows(self.row)
        if self.wraps:  # a wrapped window completed the epoch
            return None
        position = self.stream.position()
        inside = self.stream.more()
        if not inside:
            self._ended()
        wrap = inside and self.remainder == "pad"
        cut = self._cut(rows, wrap)
        self._skip((start + self.deal.window) * self.unit - self.at, wrap)
        total = self._total()
        if len(replace(self.deal, rank=0).batch(start, total, self.remainder)):  # the window was delivered
            self.row = start + self.deal.window
        else:  # the epoch ended before it: the position stays at its start
            self.held = position
        return cut.rows(len(self.deal.batch(start, total, self.remainder)), self.pack)

    def _cut(self, rows: np.ndarray, wrap: bool) -> _Cut:
        """This rank's rows of the window, as far as the epoch has them (all of them if it may `wrap`)."""
        cut = _Cut(np.full((len(rows), self.seq_len), self.pad_id, dtype=np.int32),
                   np.ones((len(rows), self.seq_len), dtype=np.uint8) if self.completion_only else None,
                   np.zeros(len(rows), dtype=np.int32), [])
        for i, row in enumerate(rows.tolist()):
            if not self._skip(row * self.unit - self.at, wrap):
                break
            mask = None if cut.mask is None else cut.mask[i]
            filled, starts = (self._packed_row if self.pack else self._padded_row)(cut.ids[i], mask, wrap)
            if not filled:
                break
            cut.filled[i] = filled
            cut.starts.append(starts)
        return cut

    def _packed_row(self, out: np.ndarray, mask: np.ndarray | None, wrap: bool) -> tuple[int, list[int]]:
        """The next seq_len tokens (fewer at the epoch's end unless it may `wrap`) and where samples start."""
        filled, starts = 0, []
        while True:
            got, begins = self.stream.copy_tokens(out[filled:], None if mask is None else mask[filled:])
            starts += [filled + b for b in begins]
            filled += got
            self.at += got
            if filled == len(out) or not self._wrap(wrap):
                return filled, starts

    def _padded_row(self, out: np.ndarray, mask: np.ndarray | None, wrap: bool) -> tuple[int, list[int]]:
        """The next sample, truncated to seq_len (none at the epoch's end unless it may `wrap`)."""
        sample = self.stream.take_sample()
        if sample is None and self._wrap(wrap):
            sample = self.stream.take_sample()
        if sample is None:
            return 0, []
        self.at += 1
        ids, loss = sample
        n = min(len(ids), len(out))
        out[:n] = ids[:n]
        if mask is not None:
            mask[:n] = loss[:n]
        return n, [0]

    @property
    def ended(self) -> bool:
        """Whether no window of the epoch is left for any rank, as far as the stream read tells (the stream's end
        reached, or its last block used up): every rank's next batch is None."""
        if self.wraps:
            return True
        end = self.end if self.end is not None else self.at if self.stream.at_end() else None
        if end is None:
            return False
        return not len(replace(self.deal, rank=0).batch(self.row, -(-end // self.unit), self.remainder))

    @property
    def past_end(self) -> bool:
        """Whether the stream ended before the position's row (the last window ran past the epoch's end)."""
        return self.held is None and not self.wraps and self.at < self.row * self.unit

    def get_state(self) -> StreamState:
        """The position at `row`: the order's state of the sample that row starts in, its tokens in earlier rows,
        and the wraps so far."""
        at, offset = self.held or self.stream.position()
        return StreamState(row=self.row, at=at, offset=offset, wraps=self.wraps)

    def set_state(self, state: StreamState) -> None:
        """Resume at the window that starts at `row` (from any rank's state of any layout with this seq_len)."""
        if state.offset and not self.pack:
            raise ValueError("a position that no packer of this dataset reaches")
        self.stream.set_state(TokenStreamState(at=state.at, offset=state.offset),
                              None if state.wraps else state.row * self.unit)
        self.row, self.wraps, self.at, self.end, self.held = state.row, state.wraps, state.row * self.unit, None, None

    def __next__(self) -> Rows:
        """This rank's next batch (see next_batch)."""
        rows = self.next_batch()
        if rows is None:
            raise StopIteration
        return rows


@dataclass
class _Cut:
    """A window's rows cut for one rank: token ids, loss mask, real tokens and sample starts per row."""

    ids: np.ndarray
    mask: np.ndarray | None
    filled: np.ndarray
    starts: list[list[int]]

    def rows(self, count: int, pack: bool) -> Rows | None:
        """The first `count` rows as a batch (None if none)."""
        if not count:
            return None
        assert count <= len(self.starts)
        filled = self.filled[:count]
        mask = None if self.mask is None else self.mask[:count]
        if not pack:
            return Rows(self.ids[:count], filled, None, mask, int(filled.sum()))
        bounds = [sorted({0, *starts}) for starts in self.starts[:count]]
        lengths = np.concatenate([np.diff([*b, n]) for b, n in zip(bounds, filled.tolist(), strict=True)])
        return Rows(self.ids[:count], lengths.astype(np.int32), np.array([len(b) for b in bounds], dtype=np.int32),
                    mask, int(filled.sum()))
