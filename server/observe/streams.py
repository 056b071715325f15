"""The open streams: each one's client, counters and credits as statistics see them, and the registry that the
servicer adds them to and removes them from (with the streams opened and closed per dataset)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .throughput import Throughput
from .timing import StepStats, TimingReport


class CreditView(Protocol):
    """What statistics read of a stream's credits (rpc/credits.py)."""

    @property
    def available(self) -> int:
        """Batches granted and not yet sent."""
        ...

    @property
    def owed_s(self) -> float:
        """Summed over the batches sent: how long the server owed each."""
        ...

    def lag_s(self) -> float:
        """How long the oldest granted, unsent batch has been owed (0: none)."""
        ...


C = TypeVar("C", bound=CreditView)


@dataclass
class ClientStream:
    """Who is at the other end of a stream, and how far it has got."""

    peer: str
    client_id: str
    rank: int
    world_size: int
    epoch: int = 0
    batches: int = 0
    tokens: int = 0
    opened: float = field(default_factory=time.monotonic)

    def connected_s(self) -> float:
        """Seconds since the stream opened."""
        return time.monotonic() - self.opened


@dataclass
class OpenStream(Generic[C]):
    """One open stream as statistics see it."""

    dataset: str
    client: ClientStream
    credits: C
    throughput: Throughput = field(default_factory=Throughput)
    steps: StepStats = field(default_factory=StepStats)  # the timing the client reports

    def report(self, timing: TimingReport) -> None:
        """Count a timing report from the client, with what the server owed it meanwhile."""
        self.steps.add(timing, owed_s=self.credits.owed_s)


class Streams(Generic[C]):
    """The open streams, and how many each dataset has had opened and closed; read by any thread."""

    def __init__(self) -> None:
        self._open: dict[int, OpenStream[C]] = {}
        self._opened: Counter[str] = Counter()
        self._closed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, stream: OpenStream[C]) -> None:
        """A stream opened."""
        with self._lock:
            self._open[id(stream)] = stream
            self._opened[stream.dataset] += 1

    def remove(self, stream: OpenStream[C]) -> None:
        """A stream closed."""
        with self._lock:
            del self._open[id(stream)]
            self._closed[stream.dataset] += 1

    def current(self) -> list[OpenStream[C]]:
        """The streams open now, oldest first."""
        with self._lock:
            return list(self._open.values())

    def now(self) -> StreamsNow[C]:
        """The open streams and the opened and closed counts, at one moment."""
        with self._lock:
            return StreamsNow(list(self._open.values()), dict(self._opened), dict(self._closed))

    def __len__(self) -> int:
        return len(self._open)


@dataclass(frozen=True)
class StreamsNow(Generic[C]):
    """The registry at one moment: the open streams, and per dataset the streams opened and closed."""

    open: list[OpenStream[C]]
    opened: Mapping[str, int]
    closed: Mapping[str, int]

    def of(self, dataset: str) -> list[OpenStream[C]]:
        """The open streams of one dataset."""
        return [s for s in self.open if s.dataset == dataset]
