"""Epoch order for streaming mode: bounded blocks, each permuted by (seed, epoch, block), dealt to ranks.

A block of `block_size` consecutive samples from the mix (fewer when they reach `block_chars` of text,
so that memory stays bounded whatever the file sizes; still a multiple of the world size) is read,
permuted with a seed derived from
(seed, epoch, block index) when a seed is set, and rank r of w takes positions r, r+w, r+2w, ... of
the permuted block. Every rank reads every block and keeps only its share, so the ranks' shares are
disjoint and together exactly the epoch's samples. The state is (block index, the mix's state at the
block's start, samples taken from the block): resuming re-reads one block, never a shuffle buffer.
"""

from __future__ import annotations

import numpy as np

from .mixing import Mixer
from .samples import Sample
from .stage import State


class BlockShuffle:
    """This rank's share of each permuted block of the mix."""

    def __init__(self, upstream: Mixer, *, block_size: int, block_chars: int, seed: int | None, epoch: int,
                 rank: int, world_size: int) -> None:
        self.upstream, self.block_size, self.block_chars = upstream, block_size, block_chars
        self.seed, self.epoch = seed, epoch
        self.rank, self.world_size = rank, world_size
        self.block = -1
        self.block_start: State = upstream.get_state()
        self.share: list[Sample] = []
        self.taken = 0
        self.finished = False

    def __iter__(self) -> BlockShuffle:
        return self

    def __next__(self) -> Sample:
        while self.taken >= len(self.share):
            if self.finished:
                raise StopIteration
            self._read_block()
        self.taken += 1
        return self.share[self.taken - 1]

    def _read_block(self) -> None:
        self.block += 1
        self.block_start = self.upstream.get_state()
        samples, chars = [], 0
        for sample in self.upstream:
            samples.append(sample)
            chars += len(sample.text)
            if len(samples) == self.block_size or (chars >= self.block_chars and
                                                   len(samples) % self.world_size == 0):
                break
        else:
            self.finished = True
        order = np.arange(len(samples))
        if self.seed is not None:
            order = np.random.default_rng([self.seed, self.epoch, self.block]).permutation(len(samples))
        self.share = [samples[i] for i in order[self.rank::self.world_size]]
        self.taken = 0

    def get_state(self) -> State:
        """Block index, the mix's state at its start, and samples of this rank's share already taken."""
        if self.taken >= len(self.share) and not self.finished:
            return {"block": self.block + 1, "start": self.upstream.get_state(), "taken": 0}
        return {"block": self.block, "start": self.block_start, "taken": self.taken}

    def set_state(self, state: State) -> None:
        """Re-read the block at `start` and skip the samples already taken."""
        self.upstream.set_state(state["start"])
        self.block = state["block"] - 1
        self.finished = False
        self.share, self.taken = [], 0
        if state["taken"]:
            self._read_block()
            self.taken = state["taken"]
