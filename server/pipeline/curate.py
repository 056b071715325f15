"""Per-source stage: normalise records, select splits, filter, count outcomes, apply task weights."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..errors import SourceError
from .accounting import SourceCounters
from .chat import MessagesFormat
from .samples import ChatFormat, Sample, normalise
from .sources.base import RawRecord, Source, SourceState
from .stage import Count, Stage, StageState

log = logging.getLogger(__name__)

FilterFn = Callable[[str | None, str], str | None]
LOGGED_BAD_RECORDS = 5


@dataclass(frozen=True)
class CurateRules:
    """What a source's records must pass, and how often a kept sample appears."""

    filter: FilterFn
    filter_override: bool | None  # None: filter code files and text, not pipeline pairs
    splits: frozenset[str]
    task_weights: dict[str, float] | None
    seed: int
    strict: bool  # on_bad_record: fail
    pair_format: ChatFormat
    messages_format: MessagesFormat | None = None  # the tokenizer's chat template, for `messages` records


def copies(weight: float, seed: int, sample_id: tuple[int, int, int]) -> int:
    """floor(w) copies, plus one more with probability frac(w), drawn from the seed and the sample id."""
    whole = math.floor(weight)
    frac = weight - whole
    if frac == 0:
        return whole
    source, file, row = sample_id
    key = f"{seed}:{source}:{file}:{row}".encode()
    draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64
    return whole + (1 if draw < frac else 0)


def task_copies(task: np.ndarray, task_types: list[str], weights: dict[str, float] | None, seed: int,
                ids: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """`copies` for many samples at once: task is each sample's index into task_types (-1: none), ids the
    samples' (source, file, row) columns. Samples of a task without a weight appear once."""
    out = np.ones(len(task), dtype=np.int64)
    for code, name in enumerate(task_types):
        if weights is None or name not in weights:
            continue
        picked = np.flatnonzero(task == code)
        weight = weights[name]
        if weight == math.floor(weight):
            out[picked] = int(weight)
        else:
            source, file, row = (column[picked].tolist() for column in ids)
            out[picked] = [copies(weight, seed, key) for key in zip(source, file, row, strict=True)]
    return out


class CurateState(StageState):
    """A curated source's position: its source's position at the current record, and the copies of that record's
    sample (task weights) already yielded."""

    at: SourceState
    skip: Count


class CuratedSource(Stage[Sample, CurateState]):
    """Samples of one source that pass its rules, each repeated by its task weight; resumable."""

    def __init__(self, source: Source, rules: CurateRules, counters: SourceCounters) -> None:
        self.source, self.rules, self.counters = source, rules, counters
        self._current: Sample | None = None
        self._state_before: SourceState | None = None  # the source's position at _current (with task weights)
        self._emitted = 0  # copies of _current already yielded
        self._remaining = 0
        self._logged = 0

    def __next__(self) -> Sample:
        while self._remaining == 0:
            # only a task weight makes copies, so only then can a position fall between a record's copies
            self._state_before = self.source.get_state() if self.rules.task_weights else None
            self._current, self._remaining = self._accept(next(self.source)), 0
            self._emitted = 0
            if self._current is not None:
                self._remaining = self._copies(self._current)
        self._remaining -= 1
        self._emitted += 1
        assert self._current is not None
        return self._current

    def _copies(self, sample: Sample) -> int:
        weights = self.rules.task_weights
        if weights is None or sample.task_type not in weights:
            return 1
        return copies(weights[sample.task_type], self.rules.seed, sample.id)

    def _accept(self, record: RawRecord) -> Sample | None:
        """The sample if the record is kept; counts the outcome once per record position."""
        counted = self.counters.claim(record.file, record.row)
        sample = normalise(record, self.rules.pair_format, self.rules.messages_format)
        if isinstance(sample, str):
            if counted:  # before _bad, which raises in fail mode: the fatal record is read, so it is counted
                self.counters.outcome(False, sample, malformed=True)
            self._bad(record, sample)
            return None
        reason = self._reject_reason(sample)
        if reason is None:
            reason = "task_weight" if self._copies(sample) == 0 else None
        if counted:
            self.counters.outcome(reason is None, reason)
        return sample if reason is None else None

    def _reject_reason(self, sample: Sample) -> str | None:
        if (sample.split or "train") not in self.rules.splits:
            return "other_split"
        apply = self.rules.filter_override
        if apply is None:
            apply = sample.kind not in ("pair", "messages")
        return self.rules.filter(sample.path, sample.text) if apply else None

    def _bad(self, record: RawRecord, reason: str) -> None:
        if self.rules.strict:
            raise SourceError(f"{record.location}: bad record ({reason}) and on_bad_record is 'fail'")
        if self._logged < LOGGED_BAD_RECORDS:
            self._logged += 1
            log.warning("%s: skipped bad record (%s)", record.location, reason)

    def get_state(self) -> CurateState:
        """The source position of the current record and how many of its copies were yielded."""
        if self._remaining == 0:
            return CurateState(at=self.source.get_state(), skip=0)
        assert self._state_before is not None
        return CurateState(at=self._state_before, skip=self._emitted)

    def retask(self, task_weights: dict[str, float] | None) -> None:
        """Copy the samples of the records read from here on by `task_weights`; a record whose copies are being
        yielded gets the copies the new weights give it (none more if it has had them), as a chain resumed here
        does: set_state counts a record's copies under the weights in force when it resumes."""
        self.rules = replace(self.rules, task_weights=task_weights)
        if self._remaining and self._current is not None:
            self._remaining = max(0, self._copies(self._current) - self._emitted)

    def restart(self) -> None:
        """Read the source again from its first record (for `all_exhausted` mixing)."""
        self.source.restart()
        self._remaining = 0

    def set_state(self, state: CurateState) -> None:
        """Resume: re-read the record at `at` and skip the copies already yielded."""
        self.source.set_state(state.at)
        self._remaining = 0
        for _ in range(state.skip):
            next(self)
