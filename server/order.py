"""Epoch order for streaming mode: bounded blocks, each permuted by (seed, epoch, block), dealt to ranks.

A block of `block_size` consecutive samples from the mix (fewer when they reach `block_chars` of text,
so that memory stays bounded whatever the file sizes; still a multiple of the world size) is read,
permuted with a seed derived from (seed, epoch, block index) when a seed is set, and rank r of w takes
positions r, r+w, r+2w, ... of the permuted block, so the ranks' shares are disjoint and together
exactly the epoch's samples. With a `BlockCache` the ranks of a layout share one read of each block,
each taking its share (see shared_read.py); without one, every rank reads every block. The state is
(block index, the mix's state at the block's start, samples taken from the block): resuming re-reads
one block, never a shuffle buffer.
"""

from __future__ import annotations

import numpy as np

from .mixing import Mixer
from .samples import Sample
from .shared_read import Block, BlockCache, block_key
from .stage import State


class BlockShuffle:
    """This rank's share of each permuted block of the mix."""

    def __init__(self, upstream: Mixer, *, block_size: int, block_chars: int, seed: int | None, epoch: int,
                 rank: int, world_size: int, shared: BlockCache | None = None) -> None:
        self.upstream, self.block_size, self.block_chars = upstream, block_size, block_chars
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size, self.shared = rank, world_size, shared
        self.block = -1
        self.block_start: State = upstream.get_state()
        self.next_start = self.block_start
        self.upstream_at: State | None = self.block_start  # where `upstream` stands (compared by identity)
        self.share: list[Sample] = []
        self.taken = 0
        self.finished = False

    def __iter__(self) -> BlockShuffle:
        return self

    def __next__(self) -> Sample:
        while self.taken >= len(self.share):
            if self.finished:
                raise StopIteration
            self._next_block()
        self.taken += 1
        return self.share[self.taken - 1]

    def _next_block(self) -> None:
        self.block += 1
        start = self.block_start = self.next_start
        if self.shared is None:
            share = self._read(start).share(self.rank)
        else:
            share = self.shared.share(block_key(self.epoch, self.block, start), self.rank, lambda: self._read(start))
        self.share, self.next_start, self.finished = share.samples, share.end, share.last
        self.taken = 0

    def _read(self, start: State) -> Block:
        """The block at `start`, read from this rank's own mix, permuted and dealt to every rank."""
        if self.upstream_at is not start:
            self.upstream.set_state(start)
        self.upstream_at = None  # unknown until the read completes
        samples, chars, last = [], 0, True
        for sample in self.upstream:
            samples.append(sample)
            chars += len(sample.text)
            if len(samples) == self.block_size or (chars >= self.block_chars and
                                                   len(samples) % self.world_size == 0):
                last = False
                break
        end = self.upstream_at = self.upstream.get_state()
        order = np.arange(len(samples))
        if self.seed is not None:
            order = np.random.default_rng([self.seed, self.epoch, self.block]).permutation(len(samples))
        shares = [[samples[i] for i in order[r::self.world_size]] for r in range(self.world_size)]
        return Block(shares, end, last, len(samples))

    def get_state(self) -> State:
        """Block index, the mix's state at its start, and samples of this rank's share already taken."""
        if self.taken >= len(self.share) and not self.finished:
            return {"block": self.block + 1, "start": self.next_start, "taken": 0}
        return {"block": self.block, "start": self.block_start, "taken": self.taken}

    def set_state(self, state: State) -> None:
        """Re-read (or take) the block at `start` and skip the samples already taken."""
        self.upstream.set_state(state["start"])  # checks the position now: a bad cursor fails here, not later
        self.upstream_at = self.next_start = state["start"]
        self.block = state["block"] - 1
        self.finished = False
        self.share, self.taken = [], 0
        if state["taken"]:
            self._next_block()
            self.taken = state["taken"]
