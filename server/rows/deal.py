"""How an epoch's rows are dealt to ranks, the same way in both modes and for every world size.

An epoch is one sequence of rows, its *global rows* (`seq_len` tokens each when packed, one sample each when
padded), fixed by the dataset, the epoch and the row length, never by the layout. Batches are cut from windows
of `world_size * batch_size` consecutive global rows, and each rank takes one residue class mod `world_size` of
each window (`batch_size` rows), so the ranks' batches of one step are one window (the global batch), whatever w
is. A position is the global row where the next window starts; it means the same thing to every layout, so a run
stopped after a step resumes on any world size (and any batch size) exactly where it stood. Which rank takes which
class never changes a step's rows, only which rank sends them:

- node-aware (cached mode, w a prefix product of V's ascending prime factors, V the virtual ranks): rank r takes
  the rows e with e mod w = sigma(r), sigma the inverse of the mixed-radix digit reversal of w (`node_order`).
  Global row e is virtual rank e mod V's, which reads region digit_reversal(V)[e mod V], so the rows e = c mod w
  read the run of V/w consecutive regions numbered digit_reversal(w)[c]: rank r reads the r-th run, and the L
  consecutive ranks of a node (torchrun numbers them L*k .. L*k + L - 1) read one run of L*V/w regions, for
  every L that divides w.
- otherwise (streaming mode, where V = 1; or w not a prefix product of V's factors): rank r takes rows start + r,
  start + r + w, ... of the window.

The end of the epoch is the same rule in both modes, applied once to that sequence of every row there is (a
packed stream's partial last row counts: it is real tokens, padded within the row): `pad` completes the last
window with rows from the epoch's start (cached mode: each virtual rank's own first rows), `drop` skips the last
partial window, `keep` sends it ragged. So `pad` repeats and `drop` skips fewer than one window's rows
(`world_size * batch_size`) per epoch, whatever the lengths, the virtual ranks and the packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


def prime_factors(n: int) -> list[int]:
    """n's prime factors in ascending order, with multiplicity (720 -> 2, 2, 2, 2, 3, 3, 5)."""
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors + ([n] if n > 1 else [])


def node_order(world_size: int, virtual: int) -> np.ndarray | None:
    """sigma: rank -> the residue class mod `world_size` it takes, so that rank r reads the r-th run of regions of
    a layout of `virtual` virtual ranks: the inverse of the mixed-radix digit reversal of `world_size` (the
    digits of r in the radix of w's factors, descending, least significant first, read in reverse order). None
    when `world_size` is not a prefix product of `virtual`'s ascending prime factors (its classes are no runs)."""
    factors, product, k = prime_factors(virtual), 1, 0
    while product < world_size and k < len(factors):
        product, k = product * factors[k], k + 1
    if product != world_size:
        return None
    r = np.arange(world_size, dtype=np.int64)
    sigma = np.zeros(world_size, dtype=np.int64)
    for p in reversed(factors[:k]):
        sigma = sigma * p + r % p
        r //= p
    return sigma


@dataclass(frozen=True)
class Deal:
    """Rank `rank` of `world_size`'s rows of each window of `world_size * batch_size` global rows, for a layout of
    `virtual` virtual ranks (1: streaming mode)."""

    rank: int
    world_size: int
    batch_size: int
    virtual: int = 1

    @property
    def window(self) -> int:
        """Global rows per step (the global batch)."""
        return self.world_size * self.batch_size

    @cached_property
    def residue(self) -> int | None:
        """The residue class mod world_size of this rank's rows (node-aware), or None: rows start + rank, ..."""
        order = node_order(self.world_size, self.virtual)
        return None if order is None else int(order[self.rank])

    def first(self, start: int) -> int:
        """This rank's first global row in the window that starts at `start`."""
        return start + self.rank if self.residue is None else start + (self.residue - start) % self.world_size

    def rows(self, start: int, count: int | None = None) -> np.ndarray:
        """The global rows of this rank's batch in the window that starts at `start` (ascending; the first `count`)."""
        size = self.batch_size if count is None else max(0, min(count, self.batch_size))
        return self.first(start) + self.world_size * np.arange(size, dtype=np.int64)

    def batch(self, start: int, total: int, remainder: str) -> np.ndarray:
        """This rank's rows of the window at `start` in an epoch of `total` rows (every row, partial ones
        included); empty when the epoch has ended for this rank. `pad`: every window that starts inside the
        epoch is whole (rows past the end wrap around to the epoch's start); `drop`: only windows wholly inside
        the epoch; `keep`: the rows inside the epoch (the last window may give ranks fewer rows, or none)."""
        if remainder == "pad":
            return self.rows(start, None if start < total else 0)
        if remainder == "drop":
            return self.rows(start, None if start + self.window <= total else 0)
        return self.rows(start, -(-(total - self.first(start)) // self.world_size))  # the rows before `total`
