"""A stream's credits: batches the client granted and the server has not sent yet, their lag, and the drain."""

from __future__ import annotations

import asyncio
import time
from collections import deque

from ..errors import Unavailable, invalid


class Credits:
    """Batches a stream may still send, refilled by the client's Credit messages; knows its oldest unmet grant."""

    def __init__(self, initial: int, limit: int, idle_s: float | None = None) -> None:
        self.limit, self.idle_s = limit, idle_s
        self.available = 0
        self.grants: deque[list[float]] = deque()  # [granted at, credits left], oldest first
        self.closed = False  # the client will send no more credits
        self.draining = False  # the server is shutting down: serve what is granted, accept no more
        self.error: Exception | None = None  # a client error, or gRPC's failure to read the call
        self.owed_s = 0.0  # summed over the batches sent: how long each was owed (the input-bound warning's cause)
        self.changed = asyncio.Condition()
        self._grant(initial)

    def _grant(self, credits: int) -> None:
        if credits:
            self.grants.append([time.monotonic(), credits])
            self.available += credits

    def lag_s(self) -> float:
        """How long the oldest credit not yet answered with a batch has waited; 0 when none is owed."""
        try:
            return time.monotonic() - self.grants[0][0]
        except IndexError:
            return 0.0

    async def add(self, credits: int) -> None:
        """Grant more; zero, or more outstanding than the limit, is a client error."""
        async with self.changed:
            if credits == 0:
                self.error = invalid("credit.credits", "must be >= 1")
            elif self.available + credits > self.limit:
                self.error = invalid("credit.credits", f"{credits} would put more than {self.limit} batches "
                                                       "outstanding (server.limits.max_credits)")
            elif not self.draining:
                self._grant(credits)
            self.changed.notify_all()

    async def fail(self, error: Exception) -> None:
        """End the stream with this error."""
        async with self.changed:
            self.error = error
            self.changed.notify_all()

    async def close(self) -> None:
        """The client half-closed its side: no more credits will come."""
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def drain(self) -> None:
        """Shutting down: what is granted is still served, new grants are ignored."""
        async with self.changed:
            self.draining = True
            self.changed.notify_all()

    async def take(self) -> bool:
        """Wait for one credit and use it; False when none can ever come (UNAVAILABLE when draining, or when
        none was granted for `idle_s`)."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(
                    lambda: self.available > 0 or self.closed or self.draining or self.error), self.idle_s)
            except TimeoutError:
                raise Unavailable(f"no credit granted for {self.idle_s:g} s (server.limits.idle_timeout_s): the "
                                   "stream was closed to free its place; resume from the last cursor") from None
            if self.error:
                raise self.error
            if self.available == 0:
                if self.draining:
                    raise Unavailable("server is shutting down; every granted "
                                                                    "batch was sent, resume from the last cursor")
                return False
            self.available -= 1
            self.owed_s += time.monotonic() - self.grants[0][0]
            self.grants[0][1] -= 1
            if not self.grants[0][1]:
                self.grants.popleft()
            return True
