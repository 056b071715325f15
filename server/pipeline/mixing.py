"""Interleave the curated sources: sequential, round_robin or weighted, seeded and resumable.

Stopping follows the finetuner (Hugging Face `interleave_datasets`): `first_exhausted` ends the mix
when any source runs out; `all_exhausted` restarts an exhausted source until every source has run
out at least once.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from pydantic import Field, StrictBool, model_validator

from ..errors import Refused
from .curate import CuratedSource, CurateState
from .samples import Sample
from .stage import Count, Stage, StageState

DRAW_CHUNK = 1024
MAX_DRAWS_PER_SAMPLE = 1000  # a layout that needs more draws than this times its samples is refused, not computed


class WeightedDraws:
    """Source choices for draw t, derived from (seed, t // DRAW_CHUNK): no RNG state to save.

    The draws do not depend on the epoch, so every epoch (and the token cache) holds the same multiset;
    epochs differ by their order, which the order stage reshuffles.
    """

    def __init__(self, weights: Sequence[float], seed: int) -> None:
        p = np.asarray(weights, dtype=np.float64)
        self.p = p / p.sum()
        self.seed = seed
        self._key = tuple(self.p.tolist())
        self._chunk = -1
        self._choices = np.empty(0, dtype=np.int64)

    def chunk(self, chunk: int) -> np.ndarray:
        """The choices of draws chunk * DRAW_CHUNK onwards, DRAW_CHUNK of them (read-only)."""
        if chunk != self._chunk:
            self._choices = _draw_chunk(self._key, self.seed, chunk)
            self._chunk = chunk
        return self._choices

    def __getitem__(self, t: int) -> int:
        return int(self.chunk(t // DRAW_CHUNK)[t % DRAW_CHUNK])


@lru_cache(maxsize=256)
def _draw_chunk(p: tuple[float, ...], seed: int, chunk: int) -> np.ndarray:
    """One chunk of draws, made once for every stream of the same weights and seed (each rank's, each resume's)."""
    choices = np.random.default_rng([seed, chunk]).choice(len(p), size=DRAW_CHUNK, p=np.asarray(p))
    choices.setflags(write=False)
    return choices


class MixState(StageState):
    """The mix's position: the turn counter, which sources ran out, whether the mix ended, and every source's
    position."""

    turn: Count
    exhausted: list[StrictBool]
    done: StrictBool
    children: list[CurateState] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_flag_per_source(self) -> MixState:
        if len(self.exhausted) != len(self.children):
            raise ValueError("exhausted and children must have one entry per source")
        return self


class Mixer(Stage[Sample, MixState]):
    """One stream of samples from several curated sources, of which the `active` ones are drawn (all by default;
    streaming mode, a source list changed inside an epoch: the mix is over the epoch's sources before and after,
    and each mixture names its own, see feed/stream_sources.py). An inactive source is never drawn, keeps its
    position, and does not count for `all_exhausted`'s end. `widen`: set_state takes a position of the first
    sources only, the others starting at their beginning (sources added)."""

    def __init__(self, children: list[CuratedSource], mode: str, stopping: str,
                 weights: Sequence[float], seed: int, active: Sequence[int] | None = None,
                 widen: bool = False) -> None:
        self.children, self.mode, self.stopping, self.seed = children, mode, stopping, seed
        self.draws: WeightedDraws | None = None
        self._activate(weights, active)
        self.starts = [child.get_state() for child in children] if widen else None
        self.turn = 0  # sequential: current child; otherwise: number of draws made
        self.exhausted = [False] * len(children)
        self.empty: set[int] = set()  # sources with no sample at all: their draws are skipped (rediscovered on resume)
        self.done = False

    def __next__(self) -> Sample:
        if self.mode == "sequential":
            return self._next_sequential()
        while not self.done:
            index = self.active[self.turn % len(self.active)] if self.draws is None else self.draws[self.turn]
            if index in self.empty:
                self.turn += 1
                continue
            child = self.children[index]
            try:
                sample = next(child)
            except StopIteration:
                self._exhaust(index)
                if self.done:
                    break
                try:
                    sample = next(child)  # restarted: the same turn draws its first sample
                except StopIteration:
                    self.empty.add(index)  # all_exhausted with an empty source: never restart it again
                    self.turn += 1
                    continue
            self.turn += 1
            return sample
        raise StopIteration

    def reweight(self, weights: Sequence[float], task_weights: dict[str, float] | None,
                 active: Sequence[int] | None = None) -> None:
        """Draw from here on the `active` sources (None: the first, one per weight) with `weights` (draw t of the
        mix still comes from (seed, t // DRAW_CHUNK)), and copy the samples of the records read from here on by
        `task_weights` (a mixture changed on resume). Given `active`, whether the mix ended is decided over them."""
        self._activate(weights, active)
        if active is not None:  # other sources drawn: the mix goes on while they have samples (ended: see _exhaust)
            drawn = [self.exhausted[i] for i in self.active]
            self.done = any(drawn) if self.stopping == "first_exhausted" else all(drawn)
        for child in self.children:
            child.retask(task_weights)

    def _activate(self, weights: Sequence[float], active: Sequence[int] | None) -> None:
        """Draw the `active` sources (None: the first ones, one per weight), weighted by `weights` (in its order); a
        weighted draw is over every source, the inactive ones weighing 0, so sources added after the others leave
        the draws of the others as they were."""
        self.active = list(range(len(weights))) if active is None else list(active)
        if len(weights) != len(self.active) or not self.active or max(self.active) >= len(self.children):
            raise ValueError(f"{len(weights)} weights for sources {self.active} of {len(self.children)}")
        if self.mode == "weighted":
            full = np.zeros(len(self.children), dtype=np.float64)
            full[self.active] = weights
            self.draws = WeightedDraws(weights if active is None else full.tolist(), self.seed)

    def _next_sequential(self) -> Sample:
        while self.turn < len(self.children):
            try:
                return next(self.children[self.turn])
            except StopIteration:
                self.turn += 1
        raise StopIteration

    def _exhaust(self, index: int) -> None:
        self.exhausted[index] = True
        if self.stopping == "first_exhausted" or all(self.exhausted[i] for i in self.active):
            self.done = True
        else:
            self.children[index].restart()

    def get_state(self) -> MixState:
        """The turn counter, which sources ran out, and every source's position."""
        return MixState(turn=self.turn, exhausted=list(self.exhausted), done=self.done,
                        children=[child.get_state() for child in self.children])

    def set_state(self, state: MixState) -> None:
        """Continue from get_state's position; ValueError for a position of another number of sources (`widen`: of
        more sources)."""
        children, exhausted = list(state.children), list(state.exhausted)
        if self.starts is not None and len(children) < len(self.children):  # sources added: at their beginning
            children += self.starts[len(children):]
            exhausted += [False] * (len(self.children) - len(exhausted))
        if len(children) != len(self.children):
            raise ValueError(f"a position of {len(state.children)} sources, but this mix has {len(self.children)}")
        self.turn, self.exhausted, self.done = state.turn, exhausted, state.done
        for child, child_state in zip(self.children, children, strict=True):
            child.set_state(child_state)


def _occurrences(choices: np.ndarray) -> np.ndarray:
    """For each choice, how many earlier choices picked the same child."""
    order = np.argsort(choices, kind="stable")
    ranked = choices[order]
    occ = np.empty(len(choices), dtype=np.int64)
    occ[order] = np.arange(len(choices)) - np.searchsorted(ranked, ranked, side="left")
    return occ


def interleave(sizes: Sequence[int], mode: str, stopping: str, weights: Sequence[float],
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The Mixer's draws over children of the given sizes, vectorised: (child, position in child) per sample
    of the mix, exactly the sequence a Mixer yields over children with that many samples each."""
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    if mode == "sequential":
        return (np.repeat(np.arange(len(sizes_arr)), sizes_arr),
                np.concatenate([np.arange(n) for n in sizes_arr]) if len(sizes_arr) else np.zeros(0, np.int64))
    draws = WeightedDraws(weights, seed) if mode == "weighted" else None
    pos = np.zeros(len(sizes_arr), dtype=np.int64)
    exhausted = np.zeros(len(sizes_arr), dtype=bool)
    empty = np.zeros(len(sizes_arr), dtype=bool)  # all_exhausted: sources with no sample, whose draws are skipped
    children, positions = [], []
    turn, limit = 0, MAX_DRAWS_PER_SAMPLE * max(int(sizes_arr.sum()), 1)
    while len(sizes_arr):
        if turn > limit:  # all_exhausted waits for a source so rarely drawn that the layout would never end
            raise Refused(f"the mixture's weights ({', '.join(f'{w:g}' for w in weights)}) draw a source so rarely "
                          f"that every source running out ({stopping}) takes more than {MAX_DRAWS_PER_SAMPLE} draws "
                          "per sample: raise the smallest weights or use stopping_strategy: first_exhausted")
        if draws is None:
            raw = (turn + np.arange(DRAW_CHUNK)) % len(sizes_arr)
        else:
            raw = draws.chunk(turn // DRAW_CHUNK)[turn % DRAW_CHUNK:]
        live = np.flatnonzero(~empty[raw])  # the draws that are not skipped, as indices into raw
        choices = raw[live]
        at = pos[choices] + _occurrences(choices)
        over = at >= sizes_arr[choices]
        hit = int(np.argmax(over)) if over.any() else len(choices)
        children.append(choices[:hit])
        positions.append(at[:hit])
        pos += np.bincount(choices[:hit], minlength=len(sizes_arr))
        if hit == len(choices):
            turn += len(raw)
            continue
        turn += int(live[hit])
        child = int(choices[hit])  # runs out at this turn; the turn is drawn again (see Mixer.__next__)
        exhausted[child] = True
        if stopping == "first_exhausted" or exhausted.all():
            break
        if sizes_arr[child] == 0:
            empty[child] = True
            turn += 1
        pos[child] = 0
    if not children:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(children).astype(np.int64), np.concatenate(positions)
