"""Interleave the curated sources: sequential, round_robin or weighted, seeded and resumable.

Stopping follows the finetuner (Hugging Face `interleave_datasets`): `first_exhausted` ends the mix
when any source runs out; `all_exhausted` restarts an exhausted source until every source has run
out at least once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .curate import CuratedSource
from .samples import Sample
from .stage import State

DRAW_CHUNK = 1024


class WeightedDraws:
    """Source choices for draw t, derived from (seed, t // DRAW_CHUNK): no RNG state to save.

    The draws do not depend on the epoch, so every epoch (and the token cache) holds the same multiset;
    epochs differ by their order, which the order stage reshuffles.
    """

    def __init__(self, weights: Sequence[float], seed: int) -> None:
        p = np.asarray(weights, dtype=np.float64)
        self.p = p / p.sum()
        self.seed = seed
        self._chunk = -1
        self._choices = np.empty(0, dtype=np.int64)

    def __getitem__(self, t: int) -> int:
        chunk = t // DRAW_CHUNK
        if chunk != self._chunk:
            rng = np.random.default_rng([self.seed, chunk])
            self._choices = rng.choice(len(self.p), size=DRAW_CHUNK, p=self.p)
            self._chunk = chunk
        return int(self._choices[t % DRAW_CHUNK])


class Mixer:
    """One stream of samples from several curated sources."""

    def __init__(self, children: list[CuratedSource], mode: str, stopping: str,
                 weights: Sequence[float], seed: int) -> None:
        self.children, self.mode, self.stopping = children, mode, stopping
        self.draws = WeightedDraws(weights, seed) if mode == "weighted" else None
        self.turn = 0  # sequential: current child; otherwise: number of draws made
        self.exhausted = [False] * len(children)
        self.done = False

    def __iter__(self) -> Mixer:
        return self

    def __next__(self) -> Sample:
        if self.mode == "sequential":
            return self._next_sequential()
        while not self.done:
            index = self.turn % len(self.children) if self.draws is None else self.draws[self.turn]
            child = self.children[index]
            try:
                sample = next(child)
            except StopIteration:
                self._exhaust(index)
                continue
            self.turn += 1
            return sample
        raise StopIteration

    def _next_sequential(self) -> Sample:
        while self.turn < len(self.children):
            try:
                return next(self.children[self.turn])
            except StopIteration:
                self.turn += 1
        raise StopIteration

    def _exhaust(self, index: int) -> None:
        self.exhausted[index] = True
        if self.stopping == "first_exhausted" or all(self.exhausted):
            self.done = True
        else:
            self.children[index].restart()

    def get_state(self) -> State:
        """The turn counter, which sources ran out, and every source's position."""
        return {"turn": self.turn, "exhausted": list(self.exhausted), "done": self.done,
                "children": [child.get_state() for child in self.children]}

    def set_state(self, state: State) -> None:
        """Continue from get_state's position."""
        self.turn, self.exhausted, self.done = state["turn"], list(state["exhausted"]), state["done"]
        for child, child_state in zip(self.children, state["children"], strict=True):
            child.set_state(child_state)
