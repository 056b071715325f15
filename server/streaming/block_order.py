"""Epoch order for streaming mode: the mix cut into bounded blocks, each permuted by (seed, epoch, block).

A block is `block_size` consecutive samples of the mix (fewer when they reach `block_chars` of text, so that
memory stays bounded whatever the file sizes), permuted with a seed derived from (seed, epoch, block index)
when a seed is set. The epoch's order is every sample of every block in turn, the same for every rank and
layout: ranks keep rows of the packed stream (pack.py, deal.py), never samples. A block's position is (block
index, the mix's state at the block's start), and a sample's position in the order adds the samples of its
block taken before it: resuming re-reads one block, never a shuffle buffer.

An epoch under more than one mixture (a phase from a row inside it, a resume under another mixture) has a plan:
block k is drawn under its mixture (block_mixtures.py: the one in force at the global row block k starts in, or
the one it was served under before a resume). The mix continues from where the block before left every source,
so a new mixture from block k serves each source's samples from the first one not yet drawn: nothing drawn before
is drawn again while the source has more. A mixture over other sources (feed/stream_sources.py) may go on after
the one before ran out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..pipeline.mixing import Mixer, MixState
from ..pipeline.samples import Sample
from ..pipeline.stage import Count, Stage, StageState

Mix = tuple[Sequence[float], dict[str, float] | None, Sequence[int] | None]
"""A mixture as the mix takes it: source weights, task weights, and the sources drawn (None: all)."""


class BlockState(StageState):
    """A block's position: its index, and the mix's state at its start."""

    block: Count
    start: MixState


class OrderState(StageState):
    """A sample's position in the epoch's order: its block's position, and the samples of the block before it."""

    block: Count
    start: MixState
    taken: Count


@dataclass(frozen=True)
class Block:
    """One block of the epoch, read and permuted."""

    index: int
    start: MixState  # the mix's state at the block's start
    samples: list[Sample]
    end: MixState  # the mix's state right after the block: the next block's start
    last: bool  # the mix ran out inside this block: it ends the epoch


class BlockShuffle(Stage[Block, BlockState]):
    """The epoch's blocks, read from this chain's mix and permuted, from a block position on."""

    def __init__(self, upstream: Mixer, *, block_size: int, block_chars: int, seed: int | None,
                 epoch: int, plan: Callable[[int], Mix] | None = None) -> None:
        self.upstream, self.block_size, self.block_chars, self.plan = upstream, block_size, block_chars, plan
        self.seed, self.epoch = seed, epoch
        self.epoch_start = upstream.get_state()
        self.upstream_at: MixState | None = self.epoch_start  # where `upstream` stands (compared by identity)
        self.next = BlockState(block=0, start=self.epoch_start)
        self.finished = False  # the last block was read

    def __next__(self) -> Block:
        """The block at the position, permuted."""
        if self.finished:
            raise StopIteration
        index, start = self.next.block, self.next.start
        if self.upstream_at is not start:
            if self.plan is not None:  # the state the block before left, under that block's mixture
                self.upstream.reweight(*self.plan(max(index - 1, 0)))
            self.upstream.set_state(start)  # checks the position: a bad cursor fails here
        if self.plan is not None:
            self.upstream.reweight(*self.plan(index))
        self.upstream_at = None  # unknown until the read completes
        samples, chars, last = [], 0, True
        for sample in self.upstream:
            samples.append(sample)
            chars += len(sample.text)
            if len(samples) == self.block_size or chars >= self.block_chars:
                last = False
                break
        end = self.upstream_at = self.upstream.get_state()
        if last and self.plan is not None and self.plan(index + 1) != self.plan(index):  # sources changed from the
            self.upstream.reweight(*self.plan(index + 1))  # next block: it goes on if they have samples
            last = self.upstream.done
        if self.seed is not None:
            order = np.random.default_rng([self.seed, self.epoch, index]).permutation(len(samples))
            samples = [samples[i] for i in order]
        self.next, self.finished = BlockState(block=index + 1, start=end), last
        return Block(index, start, samples, end, last)

    def get_state(self) -> BlockState:
        """The next block's position."""
        return self.next

    def set_state(self, state: BlockState) -> None:
        """Continue with the block at `state` (its mix position is checked when it is read)."""
        self.next, self.finished = state, False
