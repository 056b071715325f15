"""Tokenize a rank's samples in chunks and build `[batch, seq_len]` batches: packed rows or padded rows.

Packed: samples (each ending in EOS) are concatenated and cut into rows of exactly seq_len tokens; a
sample may continue into the next row. The batch carries segment lengths, from which the client
derives position_ids that restart at every segment. Padded: one sample per row, truncated to seq_len.
The packer's state is the sample it is inside and how many of its tokens were already emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .order import BlockShuffle
from .samples import Sample
from .stage import Stage, State
from .tokenize import Encoded, EncodedBatch, Encoder

# A chunk encoded in one call ends at TOKENIZE_CHUNK samples or once it holds TOKENIZE_CHUNK_CHARS of text:
# the tokenizer's working memory grows with the text, so the character bound keeps peak memory independent
# of how large the biggest files are.
TOKENIZE_CHUNK = 256
TOKENIZE_CHUNK_CHARS = 1 << 20
ENCODE_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="encode")


Chunk = tuple[list[State], list[Sample], "Future[EncodedBatch]"]
"""Samples being encoded, each with the order's state right before it."""


@dataclass
class Rows:
    """One batch of rows, ready for the wire."""

    input_ids: np.ndarray  # [rows, seq_len] token ids (int32, or the token store's dtype)
    lengths: np.ndarray  # padded: real tokens per row; packed: segment lengths, row-major
    row_segments: np.ndarray | None  # packed: segments per row
    loss_mask: np.ndarray | None  # [rows, seq_len] uint8, 1 = trained on; with completion_only
    tokens: int  # real tokens


class TokenizedSamples:
    """The rank's samples as token ids (streaming mode), encoded a chunk at a time (TOKENIZE_CHUNK samples or
    TOKENIZE_CHUNK_CHARS of text, whichever comes first).

    Chunks are encoded on ENCODE_POOL (the Rust tokenizer releases the GIL) one at a time: the next chunk
    is read while the current one encodes and submitted the moment it is done, so encoding overlaps with
    reading, packing and sending and the tokenizer never waits for Python.
    """

    def __init__(self, upstream: BlockShuffle, encoder: Encoder, *, with_prompts: bool,
                 on_encoded: Callable[[list[Sample], EncodedBatch], None]) -> None:
        self.upstream, self.encoder, self.with_prompts = upstream, encoder, with_prompts
        self.on_encoded = on_encoded
        self.states: list[State] = []  # the order's state right before each sample of `encoded`
        self.encoded: list[Encoded] = []  # views into the chunk's flat buffer
        self.index = 0
        self.ahead: Chunk | None = None  # the next chunk, encoding

    def __iter__(self) -> TokenizedSamples:
        return self

    def __next__(self) -> Encoded:
        if self.index >= len(self.states):
            self._fill()
        self.index += 1
        return self.encoded[self.index - 1]

    def _read(self) -> tuple[list[State], list[Sample]]:
        """The next chunk of samples, each with the order's state right before it."""
        states: list[State] = []
        samples: list[Sample] = []
        chars = 0
        while len(samples) < TOKENIZE_CHUNK and chars < TOKENIZE_CHUNK_CHARS:
            state = self.upstream.get_state()
            try:
                samples.append(next(self.upstream))
            except StopIteration:
                break
            states.append(state)
            chars += len(samples[-1].text)
        return states, samples

    def _encode(self, chunk: tuple[list[State], list[Sample]]) -> Chunk:
        return chunk[0], chunk[1], ENCODE_POOL.submit(self.encoder.encode, chunk[1], self.with_prompts)

    def _fill(self) -> None:
        states, samples, future = self.ahead or self._encode(self._read())
        # one chunk encodes at a time (a second would slow the first batch down); the next is read meanwhile
        # and submitted the moment this one is done, so the tokenizer never waits for Python
        following = self._read() if samples else None
        encoded = future.result()
        self.ahead = None if following is None else self._encode(following)
        if not samples:
            raise StopIteration
        self.on_encoded(samples, encoded)
        self.states, self.encoded, self.index = states, encoded.samples(), 0

    def get_state(self) -> State:
        """The order's state right before the next sample."""
        if self.index < len(self.states):
            return self.states[self.index]
        if self.ahead is not None and self.ahead[0]:
            return self.ahead[0][0]
        return self.upstream.get_state()

    def set_state(self, state: State) -> None:
        """Continue right before the sample at `state`."""
        self.upstream.set_state(state)
        self.states, self.encoded, self.index, self.ahead = [], [], 0, None


class EpochBatches:
    """What every packer shares: the epoch's batch limit and the `remainder` rule for a partial batch."""

    batch_size: int
    seq_len: int
    pack: bool
    remainder: str
    max_batches: int | None
    batches: int

    def next_batch(self) -> Rows | None:
        """The next batch, or None when the epoch has ended."""
        if (self.max_batches is not None and self.batches >= self.max_batches) or self._ended():
            return None
        rows = self._packed() if self.pack else self._padded()
        if rows is None or (self.remainder == "drop" and self._partial(rows)):
            return None
        self.batches += 1
        return rows

    def _ended(self) -> bool:
        return False

    def _partial(self, rows: Rows) -> bool:
        return rows.input_ids.shape[0] < self.batch_size or (self.pack and rows.tokens < rows.input_ids.size)

    def _packed(self) -> Rows | None:
        raise NotImplementedError

    def _padded(self) -> Rows | None:
        raise NotImplementedError


class Packer(EpochBatches):
    """Batches of packed or padded rows from a stream of encoded samples; resumable mid-sample.

    The end of an epoch follows `remainder`: `keep` sends the last partial batch, `drop` discards it,
    `pad` completes it by wrapping around to the rank's first samples. With `max_batches` (known in
    cached mode, the same for every rank) the epoch is exactly that many batches, wrapping as needed.
    """

    def __init__(self, samples: Stage[Encoded], *, batch_size: int, seq_len: int, pack: bool,
                 completion_only: bool, pad_id: int, remainder: str = "keep",
                 max_batches: int | None = None) -> None:
        self.samples, self.batch_size, self.seq_len, self.pack = samples, batch_size, seq_len, pack
        self.completion_only, self.pad_id = completion_only, pad_id
        self.remainder, self.max_batches = remainder, max_batches
        self.epoch_start: State = samples.get_state()
        self.current: Encoded | None = None  # the sample being emitted
        self.current_state: State = self.epoch_start
        self.offset = 0  # tokens of `current` already emitted
        self.batches = 0
        self.wraps = 0

    def _next_sample(self, may_wrap: bool) -> Encoded | None:
        if self.current is not None and self.offset < len(self.current.ids):
            return self.current
        self.offset = 0
        for attempt in range(2):
            self.current_state = self.samples.get_state()
            try:
                self.current = next(self.samples)
                return self.current
            except StopIteration:
                self.current = None
                if attempt or not (may_wrap and self.remainder == "pad"):
                    return None
                self.samples.set_state(self.epoch_start)
                self.wraps += 1
        return None

    def _ended(self) -> bool:
        return self.max_batches is None and self.wraps > 0  # a wrapped batch completed the epoch

    def _may_wrap(self, filled: int) -> bool:
        return filled > 0 or self.max_batches is not None

    def _packed(self) -> Rows | None:
        size = self.batch_size * self.seq_len
        flat = np.full(size, self.pad_id, dtype=np.int32)
        mask = np.ones(size, dtype=np.uint8) if self.completion_only else None
        starts = []
        filled = 0
        while filled < size and (sample := self._next_sample(self._may_wrap(filled))) is not None:
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
        while rows < self.batch_size and (sample := self._next_sample(self._may_wrap(rows))) is not None:
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
        """The sample being emitted, how many of its tokens are out, batches and wraps so far."""
        done = {"batches": self.batches, "wraps": self.wraps}
        if self.current is None or self.offset >= len(self.current.ids):
            return {"at": self.samples.get_state(), "offset": 0, **done}
        return {"at": self.current_state, "offset": self.offset, **done}

    def set_state(self, state: State) -> None:
        """Resume inside the sample at `at`, after `offset` of its tokens."""
        self.samples.set_state(state["at"])
        self.batches, self.wraps = state["batches"], state["wraps"]
        self.current = None
        if state["offset"]:
            self._next_sample(False)
            self.offset = state["offset"]
