"""Streaming mode: the ranks of one layout on a sidecar share each shuffle block read from the sources.

A block's samples are fixed by where it starts (the mix's state) and the layout (the world size rounds
the block), so the first rank to need block k of an epoch reads, parses and filters it, and the other
ranks of that world size take the same samples from a `BlockCache`; each keeps only its share and
tokenizes only that. A rank that asks for a block another rank is reading waits for that one read.

The cache holds at most `SHARED_BLOCKS` blocks per dataset and world size. A block leaves it once every
rank of the layout has taken it; past the bound the block earliest in the epoch order leaves first. A
rank that falls more than about that many blocks behind the others (stalled, slow, joined late, resumed
from an older cursor) finds its block gone and reads it itself, as if alone: it costs one more read and
changes nothing it receives, and no rank ever waits for another rank's client. The cache serves speed
only; what a rank receives never depends on it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from .samples import Sample
from .stage import State

SHARED_BLOCKS = 4
"""Blocks a dataset keeps per world size for ranks that have not taken them yet (each at most
`shuffle_block` samples and about `shuffle_block_chars` of text)."""


@dataclass(frozen=True)
class Block:
    """A block of the mix as read from the sources: its samples in mix order and where the mix stands after."""

    samples: list[Sample]
    end: State  # the mix's state right after the block: the next block's start
    last: bool  # the mix ran out inside this block


BlockKey = tuple[int, int, str]
"""(epoch, block index, the mix's state at the block's start as canonical JSON)."""


def block_key(epoch: int, block: int, start: State) -> BlockKey:
    """The cache key of block `block` of `epoch`, starting at `start`."""
    return epoch, block, json.dumps(start, sort_keys=True, separators=(",", ":"))


@dataclass
class ReadCounts:
    """How a dataset's streaming blocks were obtained: read from the sources, or taken from another rank's read."""

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
    block: Block
    takers: set[int]


@dataclass
class _Reading:
    """A block one rank is reading; the ranks that ask for it meanwhile wait for `entry`."""

    done: bool = False
    entry: _Entry | None = None  # None once done: the read failed


class BlockCache:
    """Blocks of one dataset and world size, read once, kept until every rank took them (at most `capacity`)."""

    def __init__(self, world_size: int, capacity: int, counts: ReadCounts) -> None:
        self.world_size, self.capacity, self.counts = world_size, capacity, counts
        self.entries: dict[BlockKey, _Entry] = {}
        self.reading: dict[BlockKey, _Reading] = {}
        self.changed = threading.Condition()

    def block(self, key: BlockKey, rank: int, read: Callable[[], Block]) -> Block:
        """The block at `key` for `rank`: another rank's read of it, or `read()` (shared with the others)."""
        with self.changed:
            while True:
                entry = self.entries.get(key)
                pending = self.reading.get(key)
                if entry is None and pending is not None:
                    self.changed.wait_for(lambda: pending.done)
                    entry = pending.entry
                if entry is not None:
                    self._take(key, entry, rank)
                    self.counts.shared()
                    return entry.block
                if pending is None:
                    break  # nobody has it and nobody is reading it (a failed read is tried again here)
            pending = self.reading[key] = _Reading()
        try:
            block = read()
        finally:
            with self.changed:
                del self.reading[key]
                pending.done = True
                self.changed.notify_all()
        self.counts.read(len(block.samples))
        with self.changed:
            pending.entry = _Entry(block, {rank})
            if self.world_size > 1:
                self.entries[key] = pending.entry
                self._bound()
        return block

    def _take(self, key: BlockKey, entry: _Entry, rank: int) -> None:
        entry.takers.add(rank)
        if len(entry.takers) >= self.world_size:
            self.entries.pop(key, None)

    def _bound(self) -> None:
        """Past the capacity, drop the blocks earliest in epoch order: only ranks far behind still need them."""
        while len(self.entries) > self.capacity:
            del self.entries[min(self.entries, key=lambda k: k[:2])]


class SharedReads:
    """A dataset's block caches, one per world size, each alive while a stream of that layout holds it."""

    def __init__(self, capacity: int = SHARED_BLOCKS) -> None:
        self.capacity = capacity
        self.counts = ReadCounts()
        self._caches: weakref.WeakValueDictionary[int, BlockCache] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def cache(self, world_size: int) -> BlockCache:
        """The block cache of this world size (made on first use)."""
        with self._lock:
            cache = self._caches.get(world_size)
            if cache is None:
                cache = self._caches[world_size] = BlockCache(world_size, self.capacity, self.counts)
            return cache
