"""Batches by training step for fault-tolerant data parallelism (torchft, or any setup where a replica group
restarts while the others train on): a replica that rejoins takes its position from the healthy ones.

A position is global (the row where a step starts, the same for every rank), so any healthy rank's position
resumes every rank of the rejoining replica. What the healthy replica must hand over is the position where the
step in progress starts, with that step's number: torchft calls the user's `state_dict` from its quorum thread
at the start of a step, before or after the training loop fetched that step's batch, and applies it on the
rejoining replica either at once (synchronous quorum) or at the step's commit, after that replica has sat the
step out (asynchronous quorum). `StepFeed` keeps both cases exact: it hands over (step, where it starts), and
serves each step's batch by the trainer's step counter, skipping the steps the replica did not take and giving
the same batch again to a step that is retried because it did not commit.

    feed = StepFeed(FeedDataset(target, batch_size=B, rank=replica * L + local_rank, world_size=R * L),
                    manager.current_step)
    manager = Manager(..., state_dict=lambda: {"model": ..., "data": feed.state_dict()},
                      load_state_dict=lambda s: (model.load_state_dict(s["model"]), feed.load_state_dict(s["data"])))
    while manager.current_step() < steps:
        optimizer.zero_grad()      # torchft's OptimizerWrapper: the quorum starts, a rejoining replica heals
        batch = feed.batch()       # after the quorum: this rank's rows of the step in progress
        ...
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..dataset import FeedDataset, ModelInputs
from ..position import FeedState


class StepFeed:
    """A FeedDataset read one batch per training step, the step given by `current_step` (torchft's
    `manager.current_step`: the number of committed steps)."""

    def __init__(self, dataset: FeedDataset, current_step: Callable[[], int]) -> None:
        self.dataset, self.current_step = dataset, current_step
        self._lock = threading.Lock()
        self._batches: Iterator[ModelInputs] | None = None
        self._next_step: int | None = None  # the step the dataset's position starts; None: whichever comes first
        self._last: tuple[int, FeedState, ModelInputs] | None = None  # the last batch: its step, where it started

    def batch(self) -> ModelInputs:
        """This rank's batch of the step in progress: the same batch again when that step is retried, past the
        steps this replica did not take (their batches are read and dropped) when the counter moved on.
        StopIteration when the feed ends (its configured epochs are over); ValueError if the counter went back
        before the position (load an earlier position first)."""
        step = self.current_step()
        with self._lock:
            if self._last is not None and self._last[0] == step:
                return self._last[2]
            if self._next_step is None:
                self._next_step = step
            if step < self._next_step:
                raise ValueError(f"step {step} is before the feed's position (step {self._next_step}): the step "
                                 "counter went back without a position to go back to (load_state_dict one)")
            if self._batches is None:
                self._batches = iter(self.dataset)
            while self._next_step < step:  # steps this replica sat out: the others trained on their rows
                next(self._batches)
                self._next_step += 1
            start = self.dataset.state_dict()
            batch = next(self._batches)
            self._last, self._next_step = (step, start, batch), step + 1
            return batch

    def state_dict(self) -> dict[str, Any]:
        """The step in progress and where it starts: {"step": s, "feed": the position where step s's batch starts}
        (plain types). Safe to call from another thread while the training loop fetches a batch."""
        step = self.current_step()
        with self._lock:
            if self._last is not None and self._last[0] == step:
                return {"step": step, "feed": self._last[1]}
            return {"step": step if self._next_step is None else self._next_step, "feed": self.dataset.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a healthy replica's position (from its `state_dict`): the next `batch()` serves this rank's rows of
        the step in progress from there, on this replica's own rank. ValueError for a position of another world
        size or dataset (the replicas' layouts must be the same)."""
        feed, step = state["feed"], int(state["step"])
        mine = self.dataset.state_dict()
        for key in ("world_size", "dataset"):
            if feed.get(key) != mine[key]:
                raise ValueError(f"the healthy replica's position is of {key} {feed.get(key)!r}, this replica's "
                                 f"{mine[key]!r}: every replica must read the same dataset with the same layout")
        with self._lock:
            self._close()
            self.dataset.load_state_dict(feed)
            self._next_step, self._last = step, None

    def close(self) -> None:
        """Close the stream (a new `batch()` opens another from the current position)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._batches is not None:
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
            self._batches = None
