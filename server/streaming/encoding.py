"""Streaming mode: the epoch's blocks, encoded once per sidecar, read as one stream of tokens.

A block (block_order.py) is encoded a chunk at a time (TOKENIZE_CHUNK samples or TOKENIZE_CHUNK_CHARS of text,
whichever comes first) on the runtime's encode pool, the chunks one after another in one task (the Rust
tokenizer releases the GIL and is parallel itself), so the first chunk is ready soon and the rest encode while
it is packed. Each rank reads the next block ahead on the runtime's read pool while it packs the current one, so
reading overlaps with encoding and packing. The ranks of a layout take each block from a `BlockCache`
(shared_reads.py): one read and one encoding per sidecar. While a phase from a row lies ahead, the next block's
mixture depends on the row it starts in, known once the current block is encoded (block_mixtures.py): the next
block is read ahead under the current phase's mixture meanwhile, and read again in the rare case it starts in the
next phase.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from concurrent.futures import Executor, Future
from functools import partial
from itertools import pairwise
from typing import Any

import numpy as np

from ..pipeline.mixing import MixState
from ..pipeline.samples import Sample
from ..pipeline.stage import Count, Stage, StageState
from ..pipeline.tokenize import EncodedBatch, Encoder
from ..rows.spans import loss_mask
from .block_mixtures import BlockMixtures, units_before
from .block_order import Block, BlockShuffle, BlockState, OrderState
from .shared_reads import BlockCache, EncodedBlock, block_key

# A chunk encoded in one call ends at TOKENIZE_CHUNK samples or once it holds TOKENIZE_CHUNK_CHARS of text:
# the tokenizer's working memory grows with the text, so the character bound keeps peak memory independent
# of how large the biggest files are.
TOKENIZE_CHUNK = 256
TOKENIZE_CHUNK_CHARS = 1 << 20

OnEncoded = Callable[[list[Sample], EncodedBatch], None]


def encode_block(block: Block, encoder: Encoder, *, with_prompts: bool, on_encoded: OnEncoded,
                 pool: Executor) -> EncodedBlock:
    """The block with its chunks encoding in the background on `pool` (the first one first)."""
    firsts: list[int] = []
    chars = 0
    for i, sample in enumerate(block.samples):
        if not firsts or i - firsts[-1] == TOKENIZE_CHUNK or chars >= TOKENIZE_CHUNK_CHARS:
            firsts.append(i)
            chars = 0
        chars += len(sample.text)
    bounds = [*firsts, len(block.samples)]
    parts = [block.samples[a:b] for a, b in pairwise(bounds)]
    futures: list[Future[EncodedBatch]] = [Future() for _ in parts]
    if parts:
        task = pool.submit(_encode, parts, futures, encoder, with_prompts, on_encoded)
        task.add_done_callback(partial(_cancel_if_cancelled, futures))
    return EncodedBlock(block.index, block.start, block.end, block.last, len(block.samples),
                        sum(len(s.text) for s in block.samples), firsts, futures)


def _encode(parts: list[list[Sample]], futures: list[Future[EncodedBatch]], encoder: Encoder,
            with_prompts: bool, on_encoded: OnEncoded) -> None:
    """Encode the chunks in turn, resolving each one's future; a failure fails that chunk and the rest."""
    for i, (samples, future) in enumerate(zip(parts, futures, strict=True)):
        try:
            encoded = encoder.encode(samples, with_prompts)
            on_encoded(samples, encoded)
        except BaseException as err:
            for rest in futures[i:]:
                rest.set_exception(err)
            return
        future.set_result(encoded)


def _cancel_if_cancelled(futures: list[Future[EncodedBatch]], task: Future[None]) -> None:
    """An encoding dropped before it ran (its pool shut down) cancels its chunks: nobody waits for them forever."""
    if task.cancelled():
        for future in futures:
            future.cancel()


class TokenizedBlocks(Stage[EncodedBlock, BlockState]):
    """The epoch's encoded blocks in order from a block position (its order's); the next one read ahead on
    `read_pool`, each encoded on `encode_pool`."""

    def __init__(self, order: BlockShuffle, encoder: Encoder, *, with_prompts: bool, on_encoded: OnEncoded,
                 encode_pool: Executor, read_pool: Executor, shared: BlockCache | None = None,
                 mixtures: BlockMixtures[Any] | None = None) -> None:
        self.order, self.shared, self.read_pool, self.mixtures = order, shared, read_pool, mixtures
        self.encode = partial(encode_block, encoder=encoder, with_prompts=with_prompts, on_encoded=on_encoded,
                              pool=encode_pool)
        self.next_index, self.next_start = 0, order.epoch_start
        self.next_units: int | None = 0  # the stream unit where sample `next_taken` of the next block starts
        self.next_taken = 0
        self.finished = False  # the last block was handed out
        self.ahead: Future[tuple[EncodedBlock, int | None]] | None = None  # the next block and its start, being read

    @property
    def epoch_start(self) -> MixState:
        """The mix's state at the epoch's start."""
        return self.order.epoch_start

    def __next__(self) -> EncodedBlock:
        if self.finished:
            raise StopIteration
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            block, units = ahead.result()
        else:  # the first block after set_state: a sample inside it starts at `next_units`
            taken, units = self.next_taken, self.next_units
            block = self._take(self.next_index, self.next_start, units if not taken else None)
            if taken and self._pending(units):
                assert units is not None and self.mixtures is not None
                units -= units_before(block, taken, self.mixtures.plan.pack)
        self.finished = block.last
        self.next_index, self.next_start, self.next_taken = block.index + 1, block.end, 0
        if not block.last:
            self.ahead = self.read_pool.submit(self._take_after, block, units)
        return block

    def _pending(self, units: int | None) -> bool:
        """Whether a phase by row lies after stream unit `units` (block_mixtures.py)."""
        return self.mixtures is not None and self.mixtures.plan.pending(units)

    def _take_after(self, block: EncodedBlock, units: int | None) -> tuple[EncodedBlock, int | None]:
        """The block after `block` (which starts at stream unit `units`) and where it starts: known while a phase by
        row lies ahead (None past the last one). Then the next block is read under the mixture in force where
        `block` starts while `block` encodes, and read again under another one only when its first row, known once
        `block` is encoded, is in another phase (once per phase)."""
        if not self._pending(units):
            return self._take(block.index + 1, block.end, None), None
        assert units is not None and self.mixtures is not None
        guess = self._take(block.index + 1, block.end, units, log=False)
        after = units + units_before(block, block.samples, self.mixtures.plan.pack)
        if self.mixtures.settled(block.index + 1, after):
            return guess, after
        return self._take(block.index + 1, block.end, after), after

    def _take(self, index: int, start: MixState, units: int | None, *, log: bool = True) -> EncodedBlock:
        """Block `index` at `start`, which starts at stream unit `units` (None: past every phase by row, or a block
        served before the plan's `begin`), under its mixture: from the shared cache, or read and encoded here."""
        mixture = None if self.mixtures is None else self.mixtures.choose(index, units, log=log)

        def read() -> EncodedBlock:
            self.order.set_state(BlockState(block=index, start=start))
            return self.encode(next(self.order))

        return read() if self.shared is None else self.shared.take(block_key(self.order.epoch, index, start, mixture),
                                                                   read)

    def get_state(self) -> BlockState:
        """The next block's position."""
        return BlockState(block=self.next_index, start=self.next_start)

    def set_state(self, state: BlockState, *, units: int | None = 0, taken: int = 0) -> None:
        """Continue with the block at `state`, whose sample `taken` starts at stream unit `units` (None: unknown, an
        epoch that wrapped)."""
        if self.ahead is not None:  # it reads from this chain's mix: let it finish first
            self.ahead.exception()
            self.ahead = None
        self.next_index, self.next_start, self.finished = state.block, state.start, False
        self.next_units, self.next_taken = units, taken


class TokenStreamState(StageState):
    """A token stream's position: the order's position of a sample, and the tokens of it already passed."""

    at: OrderState
    offset: Count


class TokenStream(Stage[tuple[np.ndarray, np.ndarray], TokenStreamState]):
    """The epoch's encoded samples as one stream: skip or copy tokens (or whole samples), wrap to the start,
    and the order's position (block, its start, samples taken, tokens of the next one passed) at any point.
    Iterating it yields whole samples (`take_sample`)."""

    def __init__(self, blocks: TokenizedBlocks) -> None:
        self.blocks = blocks
        self.block: EncodedBlock | None = None  # the block being read
        self.chunk_no = 0  # which of its chunks
        self.chunk: EncodedBatch | None = None  # that chunk, encoded
        self.offsets: list[int] = []  # its samples' offsets, to bisect
        self.pos = 0  # tokens of `chunk` passed

    def more(self) -> bool:
        """Whether a token is left in the epoch (loading the next chunk or block if needed)."""
        while self.chunk is None or self.pos >= len(self.chunk.ids):
            if self.block is not None and self.chunk_no + 1 < len(self.block.chunks):
                self._enter(self.block, self.chunk_no + 1, 0)
                continue
            block = next(self.blocks, None)
            if block is None:
                return False
            self.block, self.chunk, self.pos = block, None, 0
            if block.chunks:
                self._enter(block, 0, 0)
        return True

    def at_end(self) -> bool:
        """Whether the epoch's last token was passed: the last block is used up (a block used up that ended at its
        size may be the last: the next one is read to know, as the next row would)."""
        block = self.block
        if block is None:
            return False
        at, offset = self.position()
        if block.last:
            return at.taken == block.samples and not offset
        return at.block != block.index and not self.more()

    def _enter(self, block: EncodedBlock, chunk_no: int, pos: int) -> None:
        self.block, self.chunk_no, self.chunk, self.pos = block, chunk_no, block.chunks[chunk_no].result(), pos
        self.offsets = self.chunk.offsets.tolist()

    def _sample(self) -> int:
        """Index in the chunk of the sample at `pos` (the chunk's length at its end)."""
        return bisect_right(self.offsets, self.pos) - 1

    def skip_tokens(self, n: int) -> int:
        """Pass up to `n` tokens; returns how many (fewer at the epoch's end)."""
        done = 0
        while done < n and self.more():
            assert self.chunk is not None
            step = min(n - done, len(self.chunk.ids) - self.pos)
            self.pos += step
            done += step
        return done

    def copy_tokens(self, out: np.ndarray, mask: np.ndarray | None) -> tuple[int, list[int]]:
        """Fill `out` with the next tokens (fewer at the epoch's end), and `mask` with their loss mask; returns
        how many and where in `out` samples start."""
        filled, starts = 0, []
        while filled < len(out) and self.more():
            chunk = self.chunk
            assert chunk is not None
            step = min(len(out) - filled, len(chunk.ids) - self.pos)
            out[filled:filled + step] = chunk.ids[self.pos:self.pos + step]
            first = self._sample()
            last = bisect_left(self.offsets, self.pos + step)  # samples first..last-1
            begins = chunk.offsets[first:last]
            starts += (begins[begins >= self.pos] - self.pos + filled).tolist()
            if mask is not None:
                lo = np.maximum(begins, self.pos)
                hi = np.minimum(chunk.offsets[first + 1:last + 1], self.pos + step)
                mask[filled:filled + step] = loss_mask(chunk.masked, np.arange(first, last), lo - begins, hi - lo)
            filled += step
            self.pos += step
        return filled, starts

    def skip_samples(self, n: int) -> int:
        """Pass up to `n` whole samples (from a sample's start); returns how many."""
        done = 0
        while done < n and self.more():
            assert self.chunk is not None
            index = self._sample()
            step = min(n - done, len(self.chunk) - index)
            self.pos = self.offsets[index + step]
            done += step
        return done

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        sample = self.take_sample()
        if sample is None:
            raise StopIteration
        return sample

    def take_sample(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next sample's token ids and loss mask (from a sample's start), or None at the epoch's end."""
        if not self.more():
            return None
        assert self.chunk is not None
        index = self._sample()
        begin, end = self.offsets[index:index + 2]
        self.pos = end
        return self.chunk.ids[begin:end], loss_mask(self.chunk.masked, np.array([index]), np.zeros(1, dtype=np.int64),
                                                    np.array([end - begin]))

    def restart(self) -> None:
        """Go back to the epoch's start."""
        self.blocks.set_state(BlockState(block=0, start=self.blocks.epoch_start))
        self.block, self.chunk, self.pos = None, None, 0

    def position(self) -> tuple[OrderState, int]:
        """The order's state of the sample at the current position and the tokens of it already passed."""
        block = self.block
        if block is None:
            return OrderState(block=self.blocks.next_index, start=self.blocks.next_start, taken=0), 0
        taken, offset = 0, 0
        if self.chunk is not None:
            index = self._sample()
            taken = block.firsts[self.chunk_no] + index
            offset = self.pos - self.offsets[index]
        if taken == block.samples and not block.last:
            return OrderState(block=block.index + 1, start=block.end, taken=0), 0
        return OrderState(block=block.index, start=block.start, taken=taken), offset

    def get_state(self) -> TokenStreamState:
        """The order's state of the sample at the current position, and the tokens of it already passed."""
        at, offset = self.position()
        return TokenStreamState(at=at, offset=offset)

    def set_state(self, state: TokenStreamState, units: int | None = None) -> None:
        """Stand `offset` tokens into the sample at order state `at`, which is stream unit `units` of the epoch
        (None: unknown); ValueError if there is no such place."""
        at, taken, offset = state.at, state.at.taken, state.offset
        self.blocks.set_state(BlockState(block=at.block, start=at.start),
                              units=None if units is None else units - offset, taken=taken)
        self.block, self.chunk, self.pos = None, None, 0
        block = next(self.blocks, None)
        if block is None or not 0 <= taken <= block.samples:
            raise ValueError(f"the order's position {taken} is not in block {at.block}")
        self.block = block
        if not block.chunks:
            if offset:
                raise ValueError("a token offset past the end of the epoch")
            return
        chunk_no = bisect_right(block.firsts, taken) - 1
        self._enter(block, chunk_no, 0)
        assert self.chunk is not None
        index = taken - block.firsts[chunk_no]
        size = int(self.chunk.offsets[index + 1] - self.chunk.offsets[index]) if index < len(self.chunk) else 0
        if not 0 <= offset < max(size, 1):
            raise ValueError(f"token offset {offset} is not inside the sample (of {size} tokens)")
        self.pos = int(self.chunk.offsets[index]) + offset
