"""Streaming mode: the ranks of one layout on a sidecar share each shuffle block read from the sources.

A block's samples, and how they are dealt to the ranks, are fixed by the epoch, the block index, where
the block starts (the mix's state) and the world size. So the first rank to need block k of an epoch
reads, parses, filters and deals it, and the other ranks of that world size take their shares of that
one read from a `BlockCache`; each rank tokenizes only its own share. A rank that asks for a block
another rank is reading waits for that one read (never for another rank's client).

What the cache holds is bounded: the shares not yet taken, at most `SHARED_BLOCKS` blocks' worth of
samples and of text per dataset and world size (a share leaves as its rank takes it). Ranks drift
apart even in lockstep training (equal batches hold unequal numbers of samples), so a rank ahead of the
others keeps the blocks it read for them; past the bound, the block earliest in the epoch goes first. A
rank that falls so far behind that its block is gone (slow, stalled, joined late, resumed from an older
cursor) reads that block itself, as each rank did before blocks were shared: one more read, nothing it
receives changes. The cache serves speed only; what a rank receives never depends on it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from .samples import Sample
from .stage import State

SHARED_BLOCKS = 8
"""Blocks' worth of shares a dataset keeps per world size for ranks that have not taken them yet."""


@dataclass(frozen=True)
class Share:
    """A rank's share of one block, and where the mix stands after the block."""

    samples: list[Sample]
    end: State  # the mix's state right after the block: the next block's start
    last: bool  # the mix ran out inside this block


@dataclass(frozen=True)
class Block:
    """One block as read and dealt: `shares[r]` is rank r's."""

    shares: list[list[Sample]]
    end: State
    last: bool
    samples: int  # in the whole block

    def share(self, rank: int) -> Share:
        """Rank's share (holding only its own samples)."""
        return Share(self.shares[rank], self.end, self.last)


BlockKey = tuple[int, int, str]
"""(epoch, block index, the mix's state at the block's start as canonical JSON)."""


def block_key(epoch: int, block: int, start: State) -> BlockKey:
    """The cache key of block `block` of `epoch`, starting at `start`."""
    return epoch, block, json.dumps(start, sort_keys=True, separators=(",", ":"))


@dataclass
class ReadCounts:
    """How a dataset's streaming ranks got their blocks: read from the sources, or their share of another's read."""

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
        """Count one share taken from another rank's read."""
        with self.lock:
            self.blocks_shared += 1


class _Entry:
    """A read block's shares not yet taken, with their sizes."""

    def __init__(self, block: Block) -> None:
        self.block = block
        self.untaken: list[list[Sample] | None] = list(block.shares)
        self.sizes = [(len(share), sum(len(s.text) for s in share)) for share in block.shares]


@dataclass
class _Reading:
    """A block one rank is reading; the ranks that ask for it meanwhile wait for `entry`."""

    done: bool = False
    entry: _Entry | None = None  # None once done: the read failed


class BlockCache:
    """Shares of the blocks of one dataset and world size, read once, held until taken, within a bound."""

    def __init__(self, world_size: int, *, max_samples: int, max_chars: int, counts: ReadCounts) -> None:
        self.world_size, self.max_samples, self.max_chars, self.counts = world_size, max_samples, max_chars, counts
        self.entries: dict[BlockKey, _Entry] = {}
        self.reading: dict[BlockKey, _Reading] = {}
        self.samples = self.chars = 0  # held in the untaken shares of `entries`
        self.changed = threading.Condition()

    def share(self, key: BlockKey, rank: int, read: Callable[[], Block]) -> Share:
        """Rank's share of the block at `key`: from another rank's read of it, or from `read()`, shared."""
        with self.changed:
            entry = self._settled(key)
            if entry is None:
                pending = self.reading[key] = _Reading()
            else:
                share = self._take(key, entry, rank)
                if share is not None:
                    self.counts.shared()
                    return share
        if entry is not None:  # a twin (this rank of another job of the same world size) took it: read it again
            return self._read(read).share(rank)
        try:
            block = self._read(read)
        except BaseException:
            with self.changed:
                del self.reading[key]
                pending.done = True
                self.changed.notify_all()
            raise
        with self.changed:
            del self.reading[key]
            pending.entry, pending.done = _Entry(block), True
            self.changed.notify_all()
            share = self._take(key, pending.entry, rank)
            if self.world_size > 1:
                self._hold(key, pending.entry)
        assert share is not None
        return share

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

    def _read(self, read: Callable[[], Block]) -> Block:
        block = read()
        self.counts.read(block.samples)
        return block

    def _take(self, key: BlockKey, entry: _Entry, rank: int) -> Share | None:
        """Rank's share out of `entry` (None if already taken); the entry leaves once every share is out."""
        samples = entry.untaken[rank]
        if samples is None:
            return None
        entry.untaken[rank] = None
        if self.entries.get(key) is entry:
            self.samples -= entry.sizes[rank][0]
            self.chars -= entry.sizes[rank][1]
            if not any(entry.untaken):
                del self.entries[key]
        return Share(samples, entry.block.end, entry.block.last)

    def _hold(self, key: BlockKey, entry: _Entry) -> None:
        """Keep the untaken shares for their ranks; past the bound, drop the blocks earliest in epoch order."""
        held = [size for size, share in zip(entry.sizes, entry.untaken, strict=True) if share is not None]
        if not held:
            return
        self.entries[key] = entry
        self.samples += sum(n for n, _ in held)
        self.chars += sum(c for _, c in held)
        while self.entries and (self.samples > self.max_samples or self.chars > self.max_chars):
            earliest = min(self.entries, key=lambda k: k[:2])
            gone = self.entries.pop(earliest)
            for size, share in zip(gone.sizes, gone.untaken, strict=True):
                if share is not None:
                    self.samples -= size[0]
                    self.chars -= size[1]


class SharedReads:
    """A dataset's block caches, one per world size, each alive while a stream of that layout holds it."""

    def __init__(self, blocks: int = SHARED_BLOCKS) -> None:
        self.blocks = blocks
        self.counts = ReadCounts()
        self._caches: weakref.WeakValueDictionary[int, BlockCache] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def cache(self, world_size: int, *, block_size: int, block_chars: int) -> BlockCache:
        """The block cache of this world size (made on first use), bounded to `blocks` blocks' worth."""
        with self._lock:
            cache = self._caches.get(world_size)
            if cache is None:
                cache = self._caches[world_size] = BlockCache(
                    world_size, max_samples=self.blocks * block_size, max_chars=self.blocks * block_chars,
                    counts=self.counts)
            return cache
