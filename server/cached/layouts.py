"""Cached mode's epoch layouts for one dataset: computed once for all the ranks that open an epoch, the next
epoch's in the background meanwhile, so that an epoch's start does not wait for it. An epoch is laid out from the
served sequence of its mixture (each mixture's sequence computed once and kept while a layout of it is); an epoch
under more than one mixture (a phase inside it, a resume under another mixture), from its plan's segments
(segments.py)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from typing import Generic, TypeVar

import numpy as np

from ..store.reader import TokenStore
from .layout import EpochLayout, epoch_layout
from .segments import segments as plan_segments

M = TypeVar("M", bound=Hashable)
"""A mixture: what decides an epoch's served sequence."""
LAYOUTS_KEPT = 3
"""Epoch layouts kept (the epoch being served, the one before for ranks that lag, and the next one)."""


class EpochLayouts(Generic[M]):
    """The layouts of a token store's served sequences over `virtual` virtual ranks, by epoch and mixture."""

    def __init__(self, store: TokenStore, sequences: Callable[[M, np.ndarray | None], np.ndarray],
                 configured: Callable[[int], M], *,
                 virtual: int, seed: int | None, window_shards: int, pack: bool, epochs: int | None,
                 pool: Executor) -> None:
        self.store, self.sequences, self.configured, self.virtual = store, sequences, configured, virtual
        self.seed, self.window_shards, self.pack, self.epochs, self.pool = seed, window_shards, pack, epochs, pool
        self.jobs: OrderedDict[tuple[int, M], Future[EpochLayout]] = OrderedDict()
        self.kept: OrderedDict[M, np.ndarray] = OrderedDict()  # served sequences by mixture
        self.planned: OrderedDict[tuple[int, tuple[tuple[int, M], ...], int],
                                   list[tuple[int, EpochLayout, TokenStore]]] = \
            OrderedDict()  # segments by (epoch, plan, seq_len)
        self.lock = threading.Lock()

    def __getitem__(self, epoch: int) -> EpochLayout:
        """The epoch's layout under its configured mixture."""
        return self.get(epoch, self.configured(epoch))

    def get(self, epoch: int, mixture: M) -> EpochLayout:
        """The epoch's layout under `mixture` (computed now, or awaited if under way); starts computing the next
        epoch's, under its configured mixture."""
        with self.lock:
            current = self._job(epoch, mixture)
            if self.epochs is None or epoch + 1 < self.epochs:
                self._job(epoch + 1, self.configured(epoch + 1))
        return current.result()

    def _job(self, epoch: int, mixture: M) -> Future[EpochLayout]:
        """The epoch's layout, computed or being computed on the pool (call with the lock held)."""
        key = (epoch, mixture)
        job = self.jobs.get(key)
        if job is None:
            job = self.jobs[key] = self.pool.submit(self._layout, epoch, mixture)
            while len(self.jobs) > LAYOUTS_KEPT:
                self.jobs.popitem(last=False)
        self.jobs.move_to_end(key)
        return job

    def segments(self, epoch: int, plan: tuple[tuple[int, M], ...], seq_len: int,
                 other: Callable[[M], EpochLayouts[M]] | None = None) -> list[tuple[int, EpochLayout, TokenStore]]:
        """The segments of an epoch's plan ((start row, mixture) pairs, more than one): each one's first global row,
        layout and store (computed on the calling thread, once per epoch, plan and row length). `other(mixture)`:
        the layouts of the store a mixture is over (None: every mixture is over this store)."""
        key = (epoch, plan, seq_len)
        with self.lock:
            done = self.planned.get(key)
        if done is None:
            def over(mixture: M) -> tuple[TokenStore, Callable[[M, np.ndarray | None], np.ndarray]]:
                layouts = self if other is None else other(mixture)
                return layouts.store, layouts.sequences

            done = plan_segments(self.get(epoch, plan[0][1]), list(plan), over, virtual=self.virtual,
                                 seed=self.seed, epoch=epoch, window_shards=self.window_shards, seq_len=seq_len,
                                 pack=self.pack)
            with self.lock:
                self.planned[key] = done
                while len(self.planned) > LAYOUTS_KEPT:
                    self.planned.popitem(last=False)
        return done

    def _sequence(self, mixture: M) -> np.ndarray:
        """The mixture's served sequence, kept for the next epochs (two threads may both compute it: it is pure)."""
        with self.lock:
            sequence = self.kept.get(mixture)
        if sequence is None:
            sequence = self.sequences(mixture, None)
            with self.lock:
                self.kept[mixture] = sequence
                while len(self.kept) > LAYOUTS_KEPT:
                    self.kept.popitem(last=False)
        return sequence

    def _layout(self, epoch: int, mixture: M) -> EpochLayout:
        sequence = self._sequence(mixture)
        if len(sequence) and self.virtual > len(sequence):
            raise ValueError(f"epoch {epoch}'s mixture serves {len(sequence)} items, fewer than the run's "
                             f"{self.virtual} virtual ranks (fixed by epoch 0's mixture): give that epoch's "
                             "mixture more weight on its sources, or set dataset.virtual_ranks lower")
        return epoch_layout(self.store, sequence, virtual=self.virtual, seed=self.seed, epoch=epoch,
                            window_shards=self.window_shards, pack=self.pack)
