"""Tokenize a rank's samples in chunks and build `[batch, seq_len]` batches: packed rows or padded rows.

Packed: samples (each ending in EOS) are concatenated and cut into rows of exactly seq_len tokens; a
sample may continue into the next row. The batch carries segment lengths, from which the client
derives position_ids that restart at every segment. Padded: one sample per row, truncated to seq_len.
The packer's state is the sample it is inside and how many of its tokens were already emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .order import BlockShuffle
from .samples import Sample
from .stage import State
from .tokenize import Encoded, Encoder

TOKENIZE_CHUNK = 256


@dataclass
class Rows:
    """One batch of rows, ready for the wire."""

    input_ids: np.ndarray  # [rows, seq_len] int32
    lengths: np.ndarray  # padded: real tokens per row; packed: segment lengths, row-major
    row_segments: np.ndarray | None  # packed: segments per row
    loss_mask: np.ndarray | None  # [rows, seq_len] uint8, 1 = trained on; with completion_only
    tokens: int  # real tokens


class TokenizedSamples:
    """The rank's samples with their token ids, encoded TOKENIZE_CHUNK at a time."""

    def __init__(self, upstream: BlockShuffle, encoder: Encoder, *, with_prompts: bool,
                 on_encoded: Callable[[list[Sample], list[Encoded]], None]) -> None:
        self.upstream, self.encoder, self.with_prompts = upstream, encoder, with_prompts
        self.on_encoded = on_encoded
        self.buffer: list[tuple[State, Sample, Encoded]] = []
        self.index = 0

    def __iter__(self) -> TokenizedSamples:
        return self

    def __next__(self) -> tuple[Sample, Encoded]:
        if self.index >= len(self.buffer):
            self._fill()
        _, sample, encoded = self.buffer[self.index]
        self.index += 1
        return sample, encoded

    def _fill(self) -> None:
        states, samples = [], []
        for _ in range(TOKENIZE_CHUNK):
            state = self.upstream.get_state()
            try:
                samples.append(next(self.upstream))
            except StopIteration:
                break
            states.append(state)
        if not samples:
            raise StopIteration
        encoded = self.encoder.encode(samples, self.with_prompts)
        self.on_encoded(samples, encoded)
        self.buffer, self.index = list(zip(states, samples, encoded, strict=True)), 0

    def get_state(self) -> State:
        """The order's state right before the next sample."""
        if self.index < len(self.buffer):
            return self.buffer[self.index][0]
        return self.upstream.get_state()

    def set_state(self, state: State) -> None:
        """Continue right before the sample at `state`."""
        self.upstream.set_state(state)
        self.buffer, self.index = [], 0


class Packer:
    """Batches of packed or padded rows from a tokenized sample stream; resumable mid-sample."""

    def __init__(self, samples: TokenizedSamples, *, batch_size: int, seq_len: int, pack: bool,
                 completion_only: bool, pad_id: int) -> None:
        self.samples, self.batch_size, self.seq_len, self.pack = samples, batch_size, seq_len, pack
        self.completion_only, self.pad_id = completion_only, pad_id
        self.current: Encoded | None = None  # the sample being emitted
        self.current_state: State = samples.get_state()
        self.offset = 0  # tokens of `current` already emitted

    def _next_sample(self) -> Encoded | None:
        if self.current is not None and self.offset < len(self.current.ids):
            return self.current
        self.current_state = self.samples.get_state()
        try:
            _, self.current = next(self.samples)
        except StopIteration:
            self.current = None
        self.offset = 0
        return self.current

    def next_batch(self) -> Rows | None:
        """The next batch, or None when the stream has ended; the last batch may be short and padded."""
        return self._packed() if self.pack else self._padded()

    def _packed(self) -> Rows | None:
        size = self.batch_size * self.seq_len
        flat = np.full(size, self.pad_id, dtype=np.int32)
        mask = np.ones(size, dtype=np.uint8) if self.completion_only else None
        starts = []
        filled = 0
        while filled < size and (sample := self._next_sample()) is not None:
            piece = sample.ids[self.offset:self.offset + size - filled]
            flat[filled:filled + len(piece)] = piece
            if mask is not None and self.offset < sample.prompt_tokens:
                mask[filled:filled + min(sample.prompt_tokens - self.offset, len(piece))] = 0
            starts.append(filled)
            filled += len(piece)
            self.offset += len(piece)
        if filled == 0:
            return None
        rows = -(-filled // self.seq_len)
        bounds = np.union1d(np.asarray(starts), np.arange(0, filled, self.seq_len))
        lengths = np.diff(np.append(bounds, filled)).astype(np.int32)
        row_segments = np.bincount(bounds // self.seq_len, minlength=rows).astype(np.int32)
        shape = (rows, self.seq_len)
        return Rows(flat[:rows * self.seq_len].reshape(shape), lengths, row_segments,
                    None if mask is None else mask[:rows * self.seq_len].reshape(shape), filled)

    def _padded(self) -> Rows | None:
        ids = np.full((self.batch_size, self.seq_len), self.pad_id, dtype=np.int32)
        mask = np.ones_like(ids, dtype=np.uint8) if self.completion_only else None
        lengths = np.zeros(self.batch_size, dtype=np.int32)
        rows = 0
        while rows < self.batch_size and (sample := self._next_sample()) is not None:
            n = min(len(sample.ids), self.seq_len)
            ids[rows, :n] = sample.ids[:n]
            if mask is not None:
                mask[rows, :min(sample.prompt_tokens, n)] = 0
            lengths[rows] = n
            self.offset = len(sample.ids)  # truncated: the rest of the sample is dropped
            rows += 1
        if rows == 0:
            return None
        return Rows(ids[:rows], lengths[:rows], None, None if mask is None else mask[:rows],
                    int(lengths.sum()))

    def get_state(self) -> State:
        """The sample being emitted and how many of its tokens are out."""
        if self.current is None or self.offset >= len(self.current.ids):
            return {"at": self.samples.get_state(), "offset": 0}
        return {"at": self.current_state, "offset": self.offset}

    def set_state(self, state: State) -> None:
        """Resume inside the sample at `at`, after `offset` of its tokens."""
        self.samples.set_state(state["at"])
        self.current = None
        if state["offset"]:
            self._next_sample()
            self.offset = state["offset"]
