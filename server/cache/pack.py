"""Cached-mode batches: gathered from the memory map with vectorised numpy, no per-sample Python.

A rank's epoch is its share of the epoch permutation, read as one virtual token stream (samples
concatenated, EOS included). A packed batch is the next `batch_size * seq_len` positions of that stream;
with `remainder: pad` positions past its end wrap around to its start. A padded batch is the next
`batch_size` samples, each truncated to `seq_len`. The state is just the position and the batch count.
The shards a batch reads are pinned while it is cut (a remote store's are fetched into the shard cache), and
the shards of the next batches are fetched ahead.
"""

from __future__ import annotations

import numpy as np

from ..pack import EpochBatches, Rows
from ..stage import State
from ..store.reader import TokenStore

AHEAD_BATCHES = 2
"""Prefetch the shards of this many batches past the current one."""


class CachedPacker(EpochBatches):
    """One rank's batches for one epoch of a token store."""

    def __init__(self, store: TokenStore, order: np.ndarray, *, rank: int, world_size: int, batch_size: int,
                 seq_len: int, pack: bool, completion_only: bool, pad_id: int, remainder: str,
                 max_batches: int | None) -> None:
        share = order[rank::world_size]
        if not len(share) and max_batches:  # fewer samples than ranks: pad an empty share from the whole epoch
            share = order
        self.store, self.shard, self.starts = store, store.shard[share], store.offsets[share]
        self.dtype = np.dtype(store.manifest.dtype)
        self.lengths = store.lengths[share].astype(np.int64)
        self.prompts = store.prompt_tokens[share] if completion_only else None
        self.cum = np.concatenate(([0], np.cumsum(self.lengths)))  # where each sample starts in the stream
        self.batch_size, self.seq_len, self.pack, self.pad_id = batch_size, seq_len, pack, pad_id
        self.remainder, self.max_batches = remainder, max_batches
        self.pos = 0  # packed: next stream position; padded: next sample
        self.batches = 0

    @property
    def never_blocks(self) -> bool:
        """Whether cutting a batch only reads memory maps (a local store; a remote one may wait for a fetch)."""
        return self.store.shards.local

    def _span(self, count: int, total: int) -> tuple[int, int] | None:
        """Claim stream positions [start, stop) of `total` units (taken modulo total when the epoch wraps)."""
        if total == 0 or (self.max_batches is None and self.pos >= total):
            return None
        start = self.pos
        self.pos = start + count if self.max_batches is not None else min(start + count, total)
        return start, self.pos

    def _runs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The span as runs of consecutive tokens, one per sample it touches: (sample, offset into the
        sample, run length), in stream order, wrapping past the end of the epoch's stream."""
        total = int(self.cum[-1])
        samples, offsets, counts = [], [], []
        while start < stop:
            a = start % total
            b = a + min(stop - start, total - a)
            first, last = np.searchsorted(self.cum, [a, b - 1], side="right") - 1
            begins, ends = self.cum[first:last + 1], self.cum[first + 1:last + 2]
            lo = np.maximum(begins, a)
            samples.append(np.arange(first, last + 1))
            offsets.append(lo - begins)
            counts.append(np.minimum(ends, b) - lo)
            start += b - a
        return np.concatenate(samples), np.concatenate(offsets), np.concatenate(counts)

    def _packed(self) -> Rows | None:
        span = self._span(self.batch_size * self.seq_len, int(self.cum[-1]))
        if span is None:
            return None
        sample, offset, count = self._runs(*span)
        n = span[1] - span[0]
        run_start = np.cumsum(count) - count  # where each run lands in the batch
        flat = np.empty(self.batch_size * self.seq_len, dtype=self.dtype)
        first = (self.starts[sample] + offset).tolist()  # one slice per run: cheaper than a gather by index
        shards = self.shard[sample]
        self._prefetch_packed(span[1])
        with self.store.shards.pinned(np.unique(shards).tolist()) as tokens:
            np.concatenate([tokens[s][a:a + c] for s, a, c in zip(shards.tolist(), first, count.tolist(), strict=True)],
                           out=flat[:n])
        flat[n:] = self.pad_id
        rows = -(-n // self.seq_len)
        bounds = np.union1d(run_start, np.arange(0, n, self.seq_len))  # segments start at samples and rows
        lengths = np.diff(np.append(bounds, n)).astype(np.int32)
        row_segments = np.bincount(bounds // self.seq_len, minlength=rows).astype(np.int32)
        mask = None
        if self.prompts is not None:
            flat_mask = np.ones(rows * self.seq_len, dtype=np.uint8)
            within = np.arange(n) - np.repeat(run_start - offset, count)
            flat_mask[:n] = within >= np.repeat(self.prompts[sample], count)
            mask = flat_mask.reshape(rows, self.seq_len)
        return Rows(flat[:rows * self.seq_len].reshape(rows, self.seq_len), lengths, row_segments, mask, n)

    def _prefetch_packed(self, pos: int) -> None:
        """Ask for the shards of the stream's next AHEAD_BATCHES batches from position `pos` on."""
        if self.store.shards.local:
            return
        total = int(self.cum[-1])
        start = pos % total
        stop = min(total, start + AHEAD_BATCHES * self.batch_size * self.seq_len)
        first, last = np.searchsorted(self.cum, [start, max(start, stop - 1)], side="right") - 1
        self.store.shards.prefetch(self.shard[first:last + 1])

    def _padded(self) -> Rows | None:
        span = self._span(self.batch_size, len(self.lengths))
        if span is None:
            return None
        picked = np.arange(*span) % len(self.lengths)
        rows = len(picked)
        kept = np.minimum(self.lengths[picked], self.seq_len)
        ids = np.full((rows, self.seq_len), self.pad_id, dtype=self.dtype)
        shards = self.shard[picked]
        if not self.store.shards.local:
            self.store.shards.prefetch(self.shard[span[1]:span[1] + AHEAD_BATCHES * self.batch_size])
        with self.store.shards.pinned(np.unique(shards).tolist()) as tokens:
            for row, (shard, start, count) in enumerate(zip(shards.tolist(), self.starts[picked].tolist(),
                                                            kept.tolist(), strict=True)):
                ids[row, :count] = tokens[shard][start:start + count]
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
