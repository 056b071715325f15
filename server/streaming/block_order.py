"""Epoch order for streaming mode: the mix cut into bounded blocks, each permuted by (seed, epoch, block).

A block is `block_size` consecutive samples of the mix (fewer when they reach `block_chars` of text, so that
memory stays bounded whatever the file sizes), permuted with a seed derived from (seed, epoch, block index)
when a seed is set. The epoch's order is every sample of every block in turn, the same for every rank and
layout: ranks keep rows of the packed stream (pack.py, deal.py), never samples. A position in the order is
(block index, the mix's state at the block's start, samples of the block taken): resuming re-reads one
block, never a shuffle buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..pipeline.mixing import Mixer
from ..pipeline.samples import Sample
from ..pipeline.stage import State


@dataclass(frozen=True)
class Block:
    """One block of the epoch, read and permuted."""

    index: int
    start: State  # the mix's state at the block's start
    samples: list[Sample]
    end: State  # the mix's state right after the block: the next block's start
    last: bool  # the mix ran out inside this block: it ends the epoch


class BlockShuffle:
    """The epoch's blocks: block `index` starting at mix state `start`, read from this chain's mix and permuted."""

    def __init__(self, upstream: Mixer, *, block_size: int, block_chars: int, seed: int | None,
                 epoch: int) -> None:
        self.upstream, self.block_size, self.block_chars = upstream, block_size, block_chars
        self.seed, self.epoch = seed, epoch
        self.epoch_start: State = upstream.get_state()
        self.upstream_at: State | None = self.epoch_start  # where `upstream` stands (compared by identity)

    def read(self, index: int, start: State) -> Block:
        """Block `index`, which starts at the mix's state `start`, permuted."""
        if self.upstream_at is not start:
            self.upstream.set_state(start)  # checks the position: a bad cursor fails here
        self.upstream_at = None  # unknown until the read completes
        samples, chars, last = [], 0, True
        for sample in self.upstream:
            samples.append(sample)
            chars += len(sample.text)
            if len(samples) == self.block_size or chars >= self.block_chars:
                last = False
                break
        end = self.upstream_at = self.upstream.get_state()
        if self.seed is not None:
            order = np.random.default_rng([self.seed, self.epoch, index]).permutation(len(samples))
            samples = [samples[i] for i in order]
        return Block(index, start, samples, end, last)
