"""Streaming mode: the mixture of each shuffle block of an epoch, from a plan by global row.

An epoch's configured plan gives its mixtures by global row (feed/mixtures.py: a phase from row R of the epoch). A
streaming epoch is drawn block by block (block_order.py: one mixture per shuffle block), and where a block's rows
fall is known once the blocks before it are encoded. Block k starts at unit U_k of the epoch's stream (packed: the
tokens of blocks 0..k-1, each sample's EOS included; padded: their samples), so its first token or sample lies in
global row U_k // unit (unit: seq_len packed, 1 padded). Block k is drawn under the mixture the plan has in force
at that row. So a phase from row R takes effect from the first shuffle block that starts at or after row R
(U_k >= R * unit): every row before R is served under the mixture before it, and the rows from R up to that block
finish the block that was being served at R (fewer than one shuffle block's samples) under the mixture before.
U_k is the same for every rank, world size and resume (ranks cut one stream: packer.py), so the choice is too.
A phase from a row the epoch does not reach never applies in it. A `pad` epoch that wraps to its start serves its
first blocks again as they were.

While a phase of the plan lies after U_k, block k+1 is read ahead under the mixture in force at U_k's row while
block k encodes, and read again under the right one when U_{k+1} (known once block k is encoded) lies in another
phase: once per phase. Past the last phase U is no longer tracked.

A resumed epoch keeps the blocks it served under the mixtures they were drawn under (its cursor carries them:
`served`, the blocks before `begin`) and from `begin` on chooses by the plan it resumed under; its cursor carries
the plan by row too, so a later resume chooses exactly as the run would have.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .block_order import Mix
from .shared_reads import EncodedBlock

M = TypeVar("M", bound=Hashable)
"""A mixture."""

Positions = tuple[tuple[int, M], ...]
"""Mixtures, each with the position it applies from (the first from 0, the positions rising)."""

ALL_SERVED = 1 << 62
"""`begin` of an epoch that wrapped to its start: every block it reads is one it served."""


def in_force(plan: Positions[M], position: int) -> M:
    """The mixture of `plan` in force at `position`."""
    return next(mixture for start, mixture in reversed(plan) if start <= position)


@dataclass(frozen=True)
class BlockPlan(Generic[M]):
    """A streaming epoch's mixtures: by shuffle block before `begin` (served), by global row from `begin` on."""

    served: Positions[M]  # (block, mixture) of the blocks before `begin` (empty when `begin` is 0)
    begin: int
    rows: Positions[M]  # (global row, mixture): the plan the blocks from `begin` on follow
    unit: int  # stream units per global row: seq_len packed, 1 padded
    pack: bool  # units are tokens (else samples)

    def fixed(self, block: int) -> M | None:
        """The mixture block `block` was served under, if it is before `begin`."""
        return in_force(self.served, block) if block < self.begin else None

    def by_start(self, units: int | None) -> M:
        """The mixture of a block from `begin` on that starts at stream unit `units` (None: past every phase)."""
        return self.rows[-1][1] if units is None else in_force(self.rows, units // self.unit)

    def pending(self, units: int | None) -> bool:
        """Whether a phase starts after stream unit `units` (None: unknown, and not needed), so that a later block's
        mixture depends on where it starts."""
        return units is not None and self.begin < ALL_SERVED and any(row * self.unit > units for row, _ in self.rows)


@dataclass
class BlockMixtures(Generic[M]):
    """One chain's choices: the mixture of each block it reads from `plan.begin` on (by where the block starts),
    and the mixture of any block as the mix takes it (`mix`)."""

    plan: BlockPlan[M]
    as_mix: Callable[[M], Mix]
    on_change: Callable[[int, int, M], None] | None = None  # (block, its first row, mixture): a phase took effect
    chosen: dict[int, M] = field(default_factory=dict)  # block -> its mixture, for blocks from `plan.begin` on
    lock: threading.Lock = field(default_factory=threading.Lock)  # the read-ahead chooses while a cursor is made

    def choose(self, block: int, units: int | None, *, log: bool = True) -> M:
        """The mixture of `block`, which starts at stream unit `units` (None: past every phase, or before `begin`);
        reported to `on_change` when it differs from the block before's (unless `log` is off: a guess)."""
        mixture = self.plan.fixed(block)
        if mixture is None:
            mixture = self.plan.by_start(units)
            with self.lock:
                self.chosen[block] = mixture
            before = self.known(block - 1) if block else None  # unknown: a chain resumed at `block`
            if log and self.on_change is not None and units is not None and before is not None and mixture != before:
                self.on_change(block, units // self.plan.unit, mixture)
        return mixture

    def settled(self, block: int, units: int) -> bool:
        """Whether `block` was chosen under the mixture of a block that starts at stream unit `units`."""
        return self.plan.fixed(block) is not None or self.plan.by_start(units) == self.of(block)

    def known(self, block: int) -> M | None:
        """The mixture `block` was read under (chosen already, or served before `begin`), None if not chosen here."""
        mixture = self.plan.fixed(block)
        if mixture is None:
            with self.lock:
                return self.chosen.get(block)
        return mixture

    def of(self, block: int) -> M:
        """The mixture `block` was read under (chosen already, or served before `begin`)."""
        mixture = self.known(block)
        if mixture is None:
            raise KeyError(block)
        return mixture

    def mix(self, block: int) -> Mix:
        """The mixture of `block` as the mix takes it. A block not chosen yet (the one after a block where the mix ran
        out, asked whether other sources go on: block_order.py) gets the plan's last mixture by row: its sources
        are those of every mixture by row (a resumed epoch's current list), which is all that question needs."""
        mixture = self.known(block)
        return self.as_mix(self.plan.rows[-1][1] if mixture is None else mixture)

    def blocks_before(self, until: int, *, through: int | None = None) -> Positions[M]:
        """The mixtures of the blocks before `until` (all it read when it is ALL_SERVED), by block; with `through`,
        that block's too, listed even when it is the one before's (a stream that ended in it: it is served)."""
        plan: list[tuple[int, M]] = list(self.plan.served)
        with self.lock:
            chosen = sorted(((b, m) for b, m in self.chosen.items() if b < until or b == through),
                            key=lambda pair: pair[0])
        for block, mixture in chosen:
            if not plan or plan[-1][1] != mixture or block == through:
                plan.append((block, mixture))
        return tuple(plan)


def next_block(block: int, taken: int, offset: int, wraps: int) -> int:
    """The first block of a streaming position none of which is served: the block of the sample at the position,
    or the one after when that sample is begun (ALL_SERVED once the epoch wrapped to its start). A cursor whose
    stream ended before its row lists its last block as served too (`blocks_before(through=)`): the epoch is over,
    whatever mixture a resume brings."""
    return ALL_SERVED if wraps else block + (1 if taken or offset else 0)


def units_before(block: EncodedBlock, taken: int, pack: bool) -> int:
    """The stream units of the block's first `taken` samples (packed: their tokens, waiting for their encoding)."""
    if not pack:
        return taken
    if not block.chunks:
        return 0
    chunk = bisect_right(block.firsts, taken) - 1
    return sum(len(block.chunks[c].result().ids) for c in range(chunk)) + \
        int(block.chunks[chunk].result().offsets[taken - block.firsts[chunk]])
