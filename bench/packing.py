"""Packed batches for the in-process baselines: the tensors FeedDataset yields, built with numpy."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

IGNORE_INDEX = -100


class Packer:
    """Concatenates samples (EOS already appended) into [batch, seq_len] rows; yields input_ids, labels and
    position_ids restarting at every sample and row, as int64 numpy arrays (the trainer turns them into tensors)."""

    def __init__(self, batch_size: int, seq_len: int) -> None:
        self.batch_size, self.seq_len = batch_size, seq_len
        self.size = batch_size * seq_len
        self.parts: list[np.ndarray] = []
        self.filled = 0

    def add(self, ids: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        """Add one sample; yield every batch it completes."""
        self.parts.append(ids)
        self.filled += len(ids)
        while self.filled >= self.size:
            yield self._batch()

    def add_many(self, samples: Iterable[np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Add samples in order; yield every batch they complete."""
        for ids in samples:
            yield from self.add(ids)

    def _batch(self) -> dict[str, np.ndarray]:
        lengths = np.fromiter((len(p) for p in self.parts), dtype=np.int64, count=len(self.parts))
        flat = np.concatenate(self.parts)
        ids, rest = flat[:self.size], flat[self.size:]
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        starts = starts[starts < self.size]
        steps = np.ones(self.size, dtype=np.int64)
        row_starts = np.arange(0, self.size, self.seq_len)
        run_starts = np.union1d(starts, row_starts)
        steps[run_starts[1:]] = 1 - np.diff(run_starts)
        steps[0] = 0
        positions = np.cumsum(steps).reshape(self.batch_size, self.seq_len)
        input_ids = ids.astype(np.int64).reshape(self.batch_size, self.seq_len)
        labels = input_ids.copy()
        labels.reshape(-1)[run_starts] = IGNORE_INDEX
        self.parts = [rest] if len(rest) else []
        self.filled = len(rest)
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
