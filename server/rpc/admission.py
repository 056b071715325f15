"""Admission: every stream counts against the server's limits from its first byte, in total and per client."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ..config import Limits
from ..errors import Exhausted


def peer_host(peer: str) -> str:
    """The client's address without its port: `ipv4:10.0.0.7:51234` -> `10.0.0.7`, `ipv6:[::1]:5` -> `[::1]`."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0] or address
    return peer


class Admission:
    """Streams held now, in total and by client address; refuses one over `max_streams` or
    `max_streams_per_peer` with RESOURCE_EXHAUSTED."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.by_host: Counter[str] = Counter()

    @contextmanager
    def slot(self, peer: str) -> Iterator[None]:
        """Hold one stream's place for the duration of the block."""
        host, limits = peer_host(peer), self.limits
        if self.total >= limits.max_streams:
            raise Exhausted(f"{limits.max_streams} streams already open (server.limits.max_streams)")
        if self.by_host[host] >= limits.max_streams_per_peer:
            raise Exhausted(f"{limits.max_streams_per_peer} streams already open from {host} "
                               "(server.limits.max_streams_per_peer)")
        self.total += 1
        self.by_host[host] += 1
        try:
            yield
        finally:
            self.total -= 1
            self.by_host[host] -= 1
            if not self.by_host[host]:
                del self.by_host[host]
