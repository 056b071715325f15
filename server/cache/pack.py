"""Cached-mode batches: gathered from the memory map with vectorised numpy, no per-sample Python.

A rank's epoch is its share of the epoch permutation, read as one virtual token stream (samples
concatenated, EOS included). A packed batch is the next `batch_size * seq_len` positions of that stream;
with `remainder: pad` positions past its end wrap around to its start. A padded batch is the next
`batch_size` samples, each truncated to `seq_len`. The state is just the position and the batch count.
"""

from __future__ import annotations

import numpy as np

from ..pack import EpochBatches, Rows
from ..stage import State
from .store import TokenStore


class CachedPacker(EpochBatches):
    """One rank's batches for one epoch of a token store."""

    def __init__(self, store: TokenStore, order: np.ndarray, *, rank: int, world_size: int, batch_size: int,
                 seq_len: int, pack: bool, completion_only: bool, pad_id: int, remainder: str,
                 max_batches: int | None) -> None:
        share = order[rank::world_size]
        self.tokens, self.starts = store.tokens, store.offsets[share]
        self.lengths = store.lengths[share].astype(np.int64)
        self.prompts = store.prompt_tokens[share] if completion_only else None
        self.cum = np.concatenate(([0], np.cumsum(self.lengths)))  # where each sample starts in the stream
        self.batch_size, self.seq_len, self.pack, self.pad_id = batch_size, seq_len, pack, pad_id
        self.remainder, self.max_batches = remainder, max_batches
        self.pos = 0  # packed: next stream position; padded: next sample
        self.batches = 0

    def _span(self, count: int, total: int) -> np.ndarray | None:
        """Positions [pos, pos + count) of a stream of `total` units, wrapped when the epoch may wrap."""
        if total == 0 or (self.max_batches is None and self.pos >= total):
            return None
        end = self.pos + count if self.max_batches is not None else min(self.pos + count, total)
        span = np.arange(self.pos, end) % total
        self.pos = end
        return span

    def _samples_at(self, span: np.ndarray) -> np.ndarray:
        """The sample holding each stream position of a span (consecutive positions, possibly wrapped)."""
        out = []
        for piece in np.split(span, np.flatnonzero(np.diff(span) != 1) + 1):  # several only when wrapping
            first, last = np.searchsorted(self.cum, [piece[0], piece[-1]], side="right") - 1
            bounds = np.clip(self.cum[first:last + 2], piece[0], piece[-1] + 1)
            out.append(np.repeat(np.arange(first, last + 1), np.diff(bounds)))
        return np.concatenate(out)

    def _packed(self) -> Rows | None:
        span = self._span(self.batch_size * self.seq_len, int(self.cum[-1]))
        if span is None:
            return None
        sample = self._samples_at(span)
        within = span - self.cum[sample]
        n = len(span)
        flat = np.full(self.batch_size * self.seq_len, self.pad_id, dtype=np.int32)
        flat[:n] = self.tokens[self.starts[sample] + within]
        rows = -(-n // self.seq_len)
        bounds = np.flatnonzero((within == 0) | (np.arange(n) % self.seq_len == 0))
        lengths = np.diff(np.append(bounds, n)).astype(np.int32)
        row_segments = np.bincount(bounds // self.seq_len, minlength=rows).astype(np.int32)
        mask = None
        if self.prompts is not None:
            flat_mask = np.ones(rows * self.seq_len, dtype=np.uint8)
            flat_mask[:n] = within >= self.prompts[sample]
            mask = flat_mask.reshape(rows, self.seq_len)
        return Rows(flat[:rows * self.seq_len].reshape(rows, self.seq_len), lengths, row_segments, mask, n)

    def _padded(self) -> Rows | None:
        picked = self._span(self.batch_size, len(self.lengths))
        if picked is None:
            return None
        rows = len(picked)
        kept = np.minimum(self.lengths[picked], self.seq_len)
        row_of = np.repeat(np.arange(rows), kept)
        col = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
        ids = np.full((rows, self.seq_len), self.pad_id, dtype=np.int32)
        ids[row_of, col] = self.tokens[np.repeat(self.starts[picked], kept) + col]
        mask = None
        if self.prompts is not None:
            mask = (np.arange(self.seq_len)[None, :] >= self.prompts[picked][:, None]).astype(np.uint8)
        return Rows(ids, kept.astype(np.int32), None, mask, int(kept.sum()))

    def get_state(self) -> State:
        """Position in the rank's stream and batches sent this epoch."""
        return {"pos": self.pos, "batches": self.batches}

    def set_state(self, state: State) -> None:
        """Continue at a saved position."""
        self.pos, self.batches = int(state["pos"]), int(state["batches"])
