"""Cached mode's epoch layouts for one dataset: computed once for all the ranks that open an epoch, the next
epoch's in the background meanwhile, so that an epoch's start does not wait for it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Executor, Future

import numpy as np

from ..store.reader import TokenStore
from .layout import EpochLayout, epoch_layout

LAYOUTS_KEPT = 3
"""Epoch layouts kept (the epoch being served, the one before for ranks that lag, and the next one)."""


class EpochLayouts:
    """The layouts of a token store's served sequence over `virtual` virtual ranks, by epoch."""

    def __init__(self, store: TokenStore, sequence: np.ndarray, *, virtual: int, seed: int | None,
                 window_shards: int, pack: bool, epochs: int | None, pool: Executor) -> None:
        self.store, self.sequence, self.virtual = store, sequence, virtual
        self.seed, self.window_shards, self.pack, self.epochs, self.pool = seed, window_shards, pack, epochs, pool
        self.jobs: OrderedDict[int, Future[EpochLayout]] = OrderedDict()
        self.lock = threading.Lock()

    def __getitem__(self, epoch: int) -> EpochLayout:
        """The epoch's layout (computed now, or awaited if under way); starts computing the next one."""
        with self.lock:
            current = self._job(epoch)
            if self.epochs is None or epoch + 1 < self.epochs:
                self._job(epoch + 1)
        return current.result()

    def _job(self, epoch: int) -> Future[EpochLayout]:
        """The epoch's layout, computed or being computed on the pool (call with the lock held)."""
        job = self.jobs.get(epoch)
        if job is None:
            job = self.jobs[epoch] = self.pool.submit(
                epoch_layout, self.store, self.sequence, virtual=self.virtual, seed=self.seed, epoch=epoch,
                window_shards=self.window_shards, pack=self.pack)
            while len(self.jobs) > LAYOUTS_KEPT:
                self.jobs.popitem(last=False)
        self.jobs.move_to_end(epoch)
        return job
