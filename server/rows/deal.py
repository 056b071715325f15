"""How an epoch's rows are dealt to ranks, the same way in both modes and for every world size.

An epoch is one sequence of rows, its *global rows* (`seq_len` tokens each when packed, one sample each when
padded), fixed by the dataset, the epoch and the row length, never by the layout. Batches are cut from windows
of `world_size * batch_size` consecutive global rows: rank r of w takes rows start + r, start + r + w, ... of
each window, so the ranks' batches of one step are one window (the global batch), whatever w is. A position is
the global row where the next window starts; it means the same thing to every layout, so a run stopped after
a step resumes on any world size (and any batch size) exactly where it stood.

The end of the epoch is the same rule in both modes, applied once to that sequence of every row there is (a
packed stream's partial last row counts: it is real tokens, padded within the row): `pad` completes the last
window with rows from the epoch's start (cached mode: each virtual rank's own first rows), `drop` skips the last
partial window, `keep` sends it ragged. So `pad` repeats and `drop` skips fewer than one window's rows
(`world_size * batch_size`) per epoch, whatever the lengths, the virtual ranks and the packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Deal:
    """Rank `rank` of `world_size`'s rows of each window of `world_size * batch_size` global rows."""

    rank: int
    world_size: int
    batch_size: int

    @property
    def window(self) -> int:
        """Global rows per step (the global batch)."""
        return self.world_size * self.batch_size

    def rows(self, start: int) -> np.ndarray:
        """The global rows of this rank's batch in the window that starts at `start`."""
        return start + self.rank + self.world_size * np.arange(self.batch_size, dtype=np.int64)

    def batch(self, start: int, total: int, remainder: str) -> np.ndarray:
        """This rank's rows of the window at `start` in an epoch of `total` rows (every row, partial ones
        included); empty when the epoch has ended for this rank. `pad`: every window that starts inside the
        epoch is whole (rows past the end wrap around to the epoch's start); `drop`: only windows wholly inside
        the epoch; `keep`: the rows inside the epoch (the last window may give ranks fewer rows, or none)."""
        rows = self.rows(start)
        if remainder == "pad":
            return rows if start < total else rows[:0]
        if remainder == "drop":
            return rows if start + self.window <= total else rows[:0]
        return rows[rows < total]
