"""Data that grows: which files each epoch of a dataset serves.

An epoch's membership (the sources' files and their content, named by the content fingerprint of the token store
that holds them) is fixed when the epoch first opens on this server and never changes within it; the cursor
carries it, so a resumed epoch continues over the same data. When an epoch opens, the sources are looked at again
(globs expanded, each file's content identity taken, from the digest sidecar when unchanged): files added, removed
or changed make a new membership, which this epoch and the later ones serve (cached mode: its store is built first,
only its new shards). A Hugging Face source keeps the data it opened with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

KEPT = 64  # epochs whose membership is remembered (for GetStats and for ranks that lag)
SERVED = 3  # the memberships of this many latest epochs are kept ready to serve (see `recent`)


@dataclass(frozen=True)
class Membership:
    """The sources' files (per source, in order; a Hub source's is its name) and their content's fingerprint."""

    fingerprint: str
    files: list[list[str]]
    identities: list[list[object]]

    @property
    def counts(self) -> list[int]:
        """Files per source."""
        return [len(files) for files in self.files]


class Memberships:
    """The memberships of one dataset's epochs on this server: `look` says what the sources hold now, `adopt`
    readies a new membership to serve (raises if it cannot: the epoch then keeps the one before)."""

    def __init__(self, first: Membership, *, look: Callable[[], Membership],
                 adopt: Callable[[Membership], None], dataset: str) -> None:
        self.current, self.look, self.adopt, self.dataset = first, look, adopt, dataset
        self.known: dict[str, Membership] = {first.fingerprint: first}
        self.epochs: dict[int, str] = {}  # epoch -> membership fingerprint, as fixed here
        self._lock = threading.RLock()  # `adopt` may ask for `recent`

    def of_epoch(self, epoch: int) -> Membership:
        """The epoch's membership: the one fixed when it first opened here, else the sources as they are now."""
        with self._lock:
            fixed = self.epochs.get(epoch)
            if fixed is not None:
                return self.known[fixed]
            now = self.look()
            if now.fingerprint != self.current.fingerprint:
                try:
                    self.adopt(now)
                except Exception:
                    log.exception("dataset %s, epoch %d: the sources' files changed, but their new token store "
                                  "could not be readied; this epoch serves the files as they were", self.dataset,
                                  epoch)
                else:
                    log.info("dataset %s: epoch %d serves the sources' files as they are now (%s files per source, "
                             "content %s; before: %s, content %s)", self.dataset, epoch, now.counts, now.fingerprint,
                             self.current.counts, self.current.fingerprint)
                    self.current = self.known[now.fingerprint] = now
            self.epochs[epoch] = self.current.fingerprint
            for old in sorted(self.epochs)[:-KEPT]:
                del self.epochs[old]
            kept = {*self.epochs.values(), self.current.fingerprint}
            self.known = {fingerprint: m for fingerprint, m in self.known.items() if fingerprint in kept}
            return self.current

    def recent(self) -> set[str]:
        """The memberships of the SERVED latest epochs and the current one: what a server keeps ready to serve (an
        older one is opened again if a cursor asks for it)."""
        with self._lock:
            return {*(self.epochs[e] for e in sorted(self.epochs)[-SERVED:]), self.current.fingerprint}

    def fixed(self) -> list[tuple[int, Membership]]:
        """The recent epochs' memberships, by epoch."""
        with self._lock:
            return [(epoch, self.known[self.epochs[epoch]]) for epoch in sorted(self.epochs)]

    def of(self, fingerprint: str) -> Membership | None:
        """A membership this server served, by its fingerprint."""
        with self._lock:
            return self.known.get(fingerprint)
