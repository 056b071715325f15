"""Counters behind GetStats: per-source record accounting, token lengths, and connected clients.

Records are counted once per position however many streams read them: a source counts a record only
when it lies past the furthest (file, row) any stream has read from that source. So read = kept +
dropped + malformed holds for every source, and equals one pass over what the server has read.
Token counts and lengths are recorded when a sample is tokenized in epoch 0 (each rank tokenizes
its own share, so a complete set of ranks counts every sample once).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from ..protos import feed_pb2

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

    def to_proto(self) -> feed_pb2.SourceStats:
        """The GetStats view of these counters."""
        with self.lock:
            buckets = [feed_pb2.LengthBucket(upper=int(u), count=int(c))
                       for u, c in zip(LENGTH_BUCKETS, self.lengths, strict=True) if c]
            return feed_pb2.SourceStats(spec=self.spec, read=self.read, kept=self.kept,
                                        dropped=dict(self.dropped), malformed=dict(self.malformed),
                                        tokens=self.tokens, lengths=buckets)


@dataclass
class ClientStream:
    """One connected stream, as shown in stats."""

    peer: str
    client_id: str
    rank: int
    world_size: int
    epoch: int = 0
    batches: int = 0
    tokens: int = 0
    credits: int = 0
    opened: float = field(default_factory=time.monotonic)

    def to_proto(self) -> feed_pb2.ClientStats:
        """The GetStats view of this stream."""
        return feed_pb2.ClientStats(peer=self.peer, client_id=self.client_id, rank=self.rank,
                                    world_size=self.world_size, epoch=self.epoch, batches=self.batches,
                                    tokens=self.tokens, credits=self.credits,
                                    connected_s=time.monotonic() - self.opened)


class Throughput:
    """Tokens served over a sliding window of one minute."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.batches = 0
        self.tokens = 0

    def add(self, tokens: int) -> None:
        """Count one batch of `tokens` served now."""
        now = time.monotonic()
        self.batches += 1
        self.tokens += tokens
        self.events.append((now, tokens))
        while self.events and self.events[0][0] < now - self.WINDOW_S:
            self.events.popleft()

    def rate(self) -> float:
        """Tokens per second over the window."""
        if len(self.events) < 2:
            return 0.0
        span = max(self.events[-1][0] - self.events[0][0], 1e-3)
        return (sum(t for _, t in self.events) - self.events[0][1]) / span
