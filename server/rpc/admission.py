"""Admission: every stream counts against the server's limits from its first byte, in total and per client; a
stream stalled on a write gives its place up (after `write_timeout_s`, or at once to a new stream when the server
is full and it has been stalled `evict_stalled_s`); writes that hold the event loop long are paced (LoopShare)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from ..config import Limits
from ..errors import Exhausted, Unavailable


def peer_host(peer: str) -> str:
    """The client's address without its port: `ipv4:10.0.0.7:51234` -> `10.0.0.7`, `ipv6:[::1]:5` -> `[::1]`."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0] or address
    return peer


class Stalled(Unavailable):
    """A stream's write did not go out in time, or its place was given to another stream: UNAVAILABLE."""


class Place:
    """One stream's place: which client holds it, and since when the stream waits for a write to complete (the
    client does not read: HTTP/2 flow control holds the write back)."""

    def __init__(self, host: str, write_timeout_s: float) -> None:
        self.host, self.write_timeout_s = host, write_timeout_s
        self.stalled_since: float | None = None
        self.released = False  # its counts were given back (the stream ended, or was evicted)
        self._task: asyncio.Task[object] | None = None
        self._why: str | None = None  # set when the write under way was interrupted

    def stalled_s(self, now: float) -> float:
        """How long the write under way has waited; 0 when none is."""
        return 0.0 if self.stalled_since is None else now - self.stalled_since

    async def write(self, sending: Awaitable[None]) -> None:
        """Await one write; UNAVAILABLE when it does not complete within `write_timeout_s` or the place is
        evicted meanwhile (the write is cancelled, the stream ends and its place is free)."""
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.stalled_since = time.monotonic()
        timer = loop.call_later(self.write_timeout_s, self._interrupt,
                                f"the client read nothing for {self.write_timeout_s:g} s "
                                "(server.limits.write_timeout_s)")
        try:
            await sending
        except asyncio.CancelledError:
            if self._why is None:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python >= 3.11 counts cancellations
                task.uncancel()
            raise Stalled(f"{self._why}: the stream was closed to free its place; resume from the last "
                          "cursor") from None
        finally:
            timer.cancel()
            self.stalled_since = self._task = None

    def evict(self, stalled_s: float) -> None:
        """End this stream now (its write has been stalled `stalled_s`): a new stream needs its place."""
        self._interrupt(f"the client read nothing for {stalled_s:.1f} s while the server was full "
                        "(server.limits.evict_stalled_s)")

    def _interrupt(self, why: str) -> None:
        if self._task is not None and self._why is None:
            self._why = why
            self._task.cancel()


class Admission:
    """Streams held now, in total and by client address; refuses one over `max_streams` or
    `max_streams_per_peer` with RESOURCE_EXHAUSTED, unless a stream in the way has been stalled on a write for
    `evict_stalled_s`: the longest stalled one is ended to make room."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.by_host: Counter[str] = Counter()
        self.places: list[Place] = []

    @contextmanager
    def slot(self, peer: str) -> Iterator[Place]:
        """Hold one stream's place for the duration of the block."""
        host, limits = peer_host(peer), self.limits
        host_full = self.by_host[host] >= limits.max_streams_per_peer
        if (host_full or self.total >= limits.max_streams) and not self._evict(host if host_full else None):
            if self.total >= limits.max_streams:
                raise Exhausted(f"{limits.max_streams} streams already open (server.limits.max_streams)")
            raise Exhausted(f"{limits.max_streams_per_peer} streams already open from {host} "
                            "(server.limits.max_streams_per_peer)")
        place = Place(host, limits.write_timeout_s)
        self.total += 1
        self.by_host[host] += 1
        self.places.append(place)
        try:
            yield place
        finally:
            self._release(place)

    def _evict(self, host: str | None) -> bool:
        """End the stream (of `host`, or any) stalled on a write the longest, if for `evict_stalled_s` or more,
        and give its place back now; False when there is none."""
        now = time.monotonic()
        stalled = [(p.stalled_s(now), p) for p in self.places if host is None or p.host == host]
        longest, victim = max(stalled, key=lambda s: s[0], default=(0.0, None))
        if victim is None or longest < self.limits.evict_stalled_s:
            return False
        victim.evict(longest)
        self._release(victim)
        return True

    def _release(self, place: Place) -> None:
        if place.released:
            return
        place.released = True
        self.places.remove(place)
        self.total -= 1
        self.by_host[place.host] -= 1
        if not self.by_host[place.host]:
            del self.by_host[place.host]


LONG_WRITE_SHARE = 0.02
"""Most of the event loop's time that long writes (whole responses over wire.PARTS_OVER, to clients that do not
accept Parts) may take while other streams are open. A write's cost (its copy on the loop) is only the start:
gRPC then sends the 128 MB for a while after, and a small stream's p99 beside such a neighbour fell with the
share (same runs, 2 loaded cores: 12-15 ms at 10%, 8 ms at 5%, 4-6 ms at 2%; bench/README.md), while an old
client beside others still gets about one 1024x32768 batch every 1-2 s, more than a training step on 33 M
tokens takes."""


class LoopShare:
    """Paces the writes that hold the event loop long. gRPC copies an outgoing message on the event loop with the
    GIL held, and sends what flow control allows there too: a whole 128 MB batch for a client without
    `accept_parts` holds every other stream for 30-200 ms, and nothing can cut that one write shorter. While other
    streams are open, such writes take turns and begin no more often than keeps their share of the loop's time
    at `share`: each one's cost (the time until the loop's next turn) decides when the next may begin. A client
    alone on the server is not paced."""

    def __init__(self, share: float = LONG_WRITE_SHARE) -> None:
        self.share = share
        self.next_at = 0.0  # loop.time() before which no long write begins while others are open
        self.cost_s = 0.0  # the last long write's cost

    async def write(self, sending: Callable[[], Awaitable[None]], crowded: Callable[[], bool]) -> None:
        """Begin `sending` (a long write) at this writer's turn, and book the loop time it took."""
        loop = asyncio.get_running_loop()
        while crowded() and (wait := self.next_at - loop.time()) > 0:
            await asyncio.sleep(wait)
        began = loop.time()
        self.next_at = began + self.cost_s / self.share  # until this write's own cost is known
        turned: list[float] = []
        loop.call_soon(lambda: turned.append(loop.time()))  # runs at the loop's next turn, after the write's copy
        try:
            await sending()
        finally:
            self.cost_s = (turned[0] if turned else loop.time()) - began
            self.next_at = began + self.cost_s / self.share
