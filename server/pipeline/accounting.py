"""Exact accounting of what became of each source's records: read = kept + dropped + malformed, by reason, with
token counts and a length histogram. Records are counted once per position however many streams read them:
a source counts a record only when it lies past the furthest (file, row) any stream has read from that source.
Token counts and lengths are recorded when a sample is tokenized in epoch 0 (each rank tokenizes its own share,
so a complete set of ranks counts every sample once); a token store keeps its build's accounting."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..store.format import ShardFacts, SourceSnapshot

LENGTH_BUCKETS = np.array([2**k for k in range(4, 21)] + [2**63 - 1], dtype=np.int64)


@dataclass
class SourceCounters:
    """Exact accounting of one source: read = kept + sum(dropped) + sum(malformed)."""

    spec: str
    read: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    malformed: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(len(LENGTH_BUCKETS), dtype=np.int64))
    high_water: tuple[int, int] = (-1, -1)  # furthest (file, row) counted
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, file: int, row: int) -> bool:
        """True exactly once per record position: when it lies past everything counted so far."""
        with self.lock:
            if (file, row) <= self.high_water:
                return False
            self.high_water = (file, row)
            self.read += 1
            return True

    def outcome(self, kept: bool, reason: str | None = None, malformed: bool = False) -> None:
        """Record what became of a claimed record."""
        with self.lock:
            if kept:
                self.kept += 1
            elif malformed:
                self.malformed[reason or "unknown"] += 1
            else:
                self.dropped[reason or "unknown"] += 1

    def add_lengths(self, lengths: np.ndarray) -> None:
        """Add tokenized sample lengths to the token count and histogram."""
        with self.lock:
            self.tokens += int(lengths.sum())
            self.lengths += np.bincount(np.searchsorted(LENGTH_BUCKETS, lengths, side="left"),
                                        minlength=len(LENGTH_BUCKETS))

    def snapshot(self) -> dict[str, object]:
        """The counters as plain JSON (stored in a token store's manifest)."""
        with self.lock:
            return {"spec": self.spec, "read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                    "malformed": dict(self.malformed), "tokens": self.tokens, "lengths": self.lengths.tolist()}

    @classmethod
    def restore(cls, data: dict) -> SourceCounters:  # type: ignore[type-arg]
        """Counters from a snapshot; they count nothing more (the store's pass is complete)."""
        return cls(spec=data["spec"], read=data["read"], kept=data["kept"], dropped=Counter(data["dropped"]),
                   malformed=Counter(data["malformed"]), tokens=data["tokens"],
                   lengths=np.asarray(data["lengths"], dtype=np.int64), high_water=(2**62, 0))


def merge_accounting(spec: str, shards: list[ShardFacts]) -> SourceSnapshot:
    """One source's accounting: the sum of its shards' (shards without accounting count nothing)."""
    parts = [s.accounting for s in shards if s.accounting is not None]
    dropped: Counter[str] = Counter()
    malformed: Counter[str] = Counter()
    lengths = np.zeros(max((len(p.lengths) for p in parts), default=len(LENGTH_BUCKETS)), dtype=np.int64)
    for part in parts:
        dropped.update(part.dropped)
        malformed.update(part.malformed)
        lengths[:len(part.lengths)] += part.lengths
    return SourceSnapshot(spec=spec, read=sum(p.read for p in parts), kept=sum(p.kept for p in parts),
                          dropped=dict(dropped), malformed=dict(malformed), tokens=sum(p.tokens for p in parts),
                          lengths=[int(n) for n in lengths])
