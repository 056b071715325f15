"""Streaming mode: the ranks of one layout on a sidecar share each block, read, permuted and encoded once.

Every rank packs the whole stream of the epoch and keeps its own rows (see deal.py), so every rank needs every
block, encoded. A block, its order and its tokens are fixed by the epoch, the block index and where the block
starts (the mix's state). So the first rank to need block k of an epoch reads, parses, filters, permutes and
encodes it (its chunks encode on the encode pool while the ranks pack the first ones), and the other ranks of
that world size take that same block from a `BlockCache`. A rank that asks for a block another rank is
reading waits for that one read (never for another rank's client).

What the cache holds is bounded: blocks not yet taken by every rank of the layout, at most `SHARED_BLOCKS`
blocks (each at most `shuffle_block` samples) and that many blocks' worth of text (`shuffle_block_chars`),
with their token ids, per dataset and world size (a block leaves once its last rank takes it). Ranks drift apart
even in lockstep training, so a rank ahead of the others keeps the blocks it read for them; past the bound,
the block earliest in the epoch goes first. A rank that falls so far behind that its block is gone (slow,
stalled, joined late, resumed from an older cursor) reads and encodes that block itself: one more read,
nothing it receives changes. The cache serves speed only; what a rank receives never depends on it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..pipeline.mixing import MixState
from ..pipeline.tokenize import EncodedBatch

SHARED_BLOCKS = 8
"""Blocks a dataset keeps per world size for ranks that have not taken them yet."""


@dataclass(frozen=True)
class EncodedBlock:
    """One block of the epoch as its samples' token ids, in chunks that encode in the background."""

    index: int
    start: MixState  # the mix's state at the block's start
    end: MixState  # the mix's state right after the block: the next block's start
    last: bool  # the mix ran out inside this block: it ends the epoch
    samples: int
    chars: int  # of the samples' text
    firsts: list[int]  # the block's index of each chunk's first sample
    chunks: list[Future[EncodedBatch]]


BlockKey = tuple[int, int, str]
"""(epoch, block index, the mix's state at the block's start as JSON and the block's mixture)."""


def block_key(epoch: int, block: int, start: MixState, mixture: Hashable = None) -> BlockKey:
    """The cache key of block `block` of `epoch`, starting at `start`, drawn under `mixture` (a block read ahead under
    a guessed mixture is not the block read under another)."""
    return epoch, block, start.model_dump_json() + ("" if mixture is None else f" {mixture!r}")


@dataclass
class ReadCounts:
    """How a dataset's streaming ranks got their blocks: read from the sources, or taken from another's read."""

    blocks_read: int = 0
    samples_read: int = 0
    blocks_shared: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, samples: int) -> None:
        """Count one block read from the sources."""
        with self.lock:
            self.blocks_read += 1
            self.samples_read += samples

    def shared(self) -> None:
        """Count one block taken from another rank's read."""
        with self.lock:
            self.blocks_shared += 1


@dataclass
class _Entry:
    """A read block and how many more ranks of the layout will take it."""

    block: EncodedBlock
    takers: int


@dataclass
class _Reading:
    """A block one rank is reading; the ranks that ask for it meanwhile wait for `entry`."""

    done: bool = False
    entry: _Entry | None = None  # None once done: the read failed


class BlockCache:
    """The blocks of one dataset and world size, read once, held until every rank took them, within a bound."""

    def __init__(self, world_size: int, *, max_blocks: int, max_chars: int, counts: ReadCounts) -> None:
        self.world_size, self.max_blocks, self.max_chars, self.counts = world_size, max_blocks, max_chars, counts
        self.entries: dict[BlockKey, _Entry] = {}
        self.reading: dict[BlockKey, _Reading] = {}
        self.chars = 0  # of the samples of the blocks in `entries`
        self.changed = threading.Condition()

    def take(self, key: BlockKey, read: Callable[[], EncodedBlock]) -> EncodedBlock:
        """The block at `key`: another rank's read of it, or `read()`, then held for the other ranks."""
        with self.changed:
            entry = self._settled(key)
            if entry is not None:
                self._taken(key, entry)
                self.counts.shared()
                return entry.block
            pending = self.reading[key] = _Reading()
        try:
            block = read()
        except BaseException:
            with self.changed:
                del self.reading[key]
                pending.done = True
                self.changed.notify_all()
            raise
        self.counts.read(block.samples)
        with self.changed:
            del self.reading[key]
            pending.entry, pending.done = _Entry(block, self.world_size - 1), True
            self.changed.notify_all()
            if pending.entry.takers > 0:
                self._hold(key, pending.entry)
        return block

    def _settled(self, key: BlockKey) -> _Entry | None:
        """The block at `key` once nobody is reading it (waiting for a read in progress); None if nobody has it."""
        while True:
            pending = self.reading.get(key)
            if pending is None:
                return self.entries.get(key)
            while not pending.done:
                self.changed.wait()
            if pending.entry is not None:
                return pending.entry
            # that read failed: look again (the next rank to ask reads it)

    def _taken(self, key: BlockKey, entry: _Entry) -> None:
        """One more rank took `entry`: it leaves once the last one has."""
        entry.takers -= 1
        if entry.takers <= 0 and self.entries.get(key) is entry:
            self._drop(key)

    def _hold(self, key: BlockKey, entry: _Entry) -> None:
        """Keep `entry` for the other ranks; past the bound, drop the blocks earliest in epoch order."""
        self.entries[key] = entry
        self.chars += entry.block.chars
        while self.entries and (len(self.entries) > self.max_blocks or self.chars > self.max_chars):
            self._drop(min(self.entries, key=lambda k: k[:2]))

    def _drop(self, key: BlockKey) -> None:
        self.chars -= self.entries.pop(key).block.chars


class SharedReads:
    """A dataset's block caches, one per world size and mixture, each alive while a stream of that layout holds
    it."""

    def __init__(self, blocks: int = SHARED_BLOCKS) -> None:
        self.blocks = blocks
        self.counts = ReadCounts()
        self._caches: weakref.WeakValueDictionary[tuple[int, Hashable], BlockCache] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def cache(self, world_size: int, *, block_chars: int, mixture: Hashable = None) -> BlockCache:
        """The block cache of this world size and mixture (made on first use; a block's samples depend on the
        mixture), bounded to `blocks` blocks and their text."""
        with self._lock:
            cache = self._caches.get((world_size, mixture))
            if cache is None:
                cache = self._caches[world_size, mixture] = BlockCache(
                    world_size, max_blocks=self.blocks, max_chars=self.blocks * block_chars, counts=self.counts)
            return cache
