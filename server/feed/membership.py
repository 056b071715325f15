"""Data that grows: which files each epoch of a dataset serves.

An epoch's membership (the sources' files and their content, named by the content fingerprint of the token store
that holds them) is fixed when the epoch first opens on this server and never changes within it; the cursor
carries it, so a resumed epoch continues over the same data. A stream that names its run (`Open.run_id`) takes the
membership the run's first sidecar to open the epoch recorded in the shared store (run_members.py), so every sidecar
of a multi-node job serves the same files in each epoch. When an epoch opens, the sources are looked at again
(globs expanded, each file's content identity taken, from the digest sidecar when unchanged): files added, removed
or changed make a new membership, which this epoch and the later ones serve (cached mode: its store is built first,
only its new shards). A Hugging Face source keeps the data it opened with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


class RunRecords(Protocol):
    """Where a run's sidecars agree on each epoch's membership (run_members.RunMembers)."""

    def agreed(self, run: str, epoch: int) -> Membership | None:
        """The membership recorded for the run's epoch, if any."""

    def claim(self, run: str, epoch: int, ours: Membership) -> Membership:
        """Record `ours` unless a record exists; the membership recorded."""


class Memberships:
    """The memberships of one dataset's epochs on this server: `look` says what the sources hold now, `adopt`
    readies a new membership to serve (raises if it cannot: the epoch then keeps the one before), `runs` holds what
    the sidecars of a run agreed on (None: no shared store), `localize` takes a recorded membership to the paths of
    the same files here."""

    def __init__(self, first: Membership, *, look: Callable[[], Membership],
                 adopt: Callable[[Membership], None], dataset: str, runs: RunRecords | None = None,
                 localize: Callable[[Membership], Membership] = lambda m: m) -> None:
        self.current, self.look, self.adopt, self.dataset = first, look, adopt, dataset
        self.runs, self.localize = runs, localize
        self.known: dict[str, Membership] = {first.fingerprint: first}
        self.epochs: dict[tuple[str, int], str] = {}  # (run, epoch) -> membership fingerprint, as fixed here
        self._lock = threading.RLock()  # `adopt` may ask for `recent`

    def of_epoch(self, epoch: int, run: str = "") -> Membership:
        """The epoch's membership: the one fixed when it first opened here; else, for a named run, the one its
        record holds; else the sources as they are now (recorded for the run's other sidecars)."""
        with self._lock:
            fixed = self.epochs.get((run, epoch))
            if fixed is not None:
                return self.known[fixed]
            runs = self.runs if run else None
            agreed = runs.agreed(run, epoch) if runs is not None else None
            if agreed is None:
                self._take_sources_now(epoch)
                if runs is not None:
                    agreed = runs.claim(run, epoch, self.current)
            if agreed is not None and agreed.fingerprint != self.current.fingerprint:
                self._serve_agreed(epoch, run, agreed)
            self.epochs[run, epoch] = self.current.fingerprint
            for old in _by_epoch(self.epochs)[:-KEPT]:
                del self.epochs[old]
            kept = {*self.epochs.values(), self.current.fingerprint}
            self.known = {fingerprint: m for fingerprint, m in self.known.items() if fingerprint in kept}
            return self.current

    def _take_sources_now(self, epoch: int) -> None:
        """The sources as they are now become the current membership, if their store can be readied."""
        now = self.look()
        if now.fingerprint == self.current.fingerprint:
            return
        try:
            self.adopt(now)
        except Exception:
            log.exception("dataset %s, epoch %d: the sources' files changed, but their new token store could not "
                          "be readied; this epoch serves the files as they were", self.dataset, epoch)
        else:
            log.info("dataset %s: epoch %d serves the sources' files as they are now (%s files per source, content "
                     "%s; before: %s, content %s)", self.dataset, epoch, now.counts, now.fingerprint,
                     self.current.counts, self.current.fingerprint)
            self.current = self.known[now.fingerprint] = now

    def _serve_agreed(self, epoch: int, run: str, agreed: Membership) -> None:
        """The run's recorded membership becomes the current one (raises if it cannot be readied here: the epoch
        is not fixed, and the next stream to open it tries again)."""
        members = self.known.get(agreed.fingerprint) or self.localize(agreed)
        self.adopt(members)
        log.info("dataset %s, run %s: epoch %d serves the files the run's first sidecar to open it recorded (%s "
                 "files per source, content %s; this sidecar had %s, content %s)", self.dataset, run, epoch,
                 members.counts, members.fingerprint, self.current.counts, self.current.fingerprint)
        self.current = self.known[members.fingerprint] = members

    def recent(self) -> set[str]:
        """The memberships of the SERVED latest epochs and the current one: what a server keeps ready to serve (an
        older one is opened again if a cursor asks for it)."""
        with self._lock:
            return {*(self.epochs[k] for k in _by_epoch(self.epochs)[-SERVED:]), self.current.fingerprint}

    def fixed(self) -> list[tuple[int, Membership]]:
        """The recent epochs' memberships, by epoch (an epoch served to several runs here: once per membership)."""
        with self._lock:
            pairs = {(epoch, self.epochs[run, epoch]) for run, epoch in self.epochs}
            return [(epoch, self.known[fingerprint]) for epoch, fingerprint in sorted(pairs)]

    def of(self, fingerprint: str) -> Membership | None:
        """A membership this server served, by its fingerprint."""
        with self._lock:
            return self.known.get(fingerprint)


def _by_epoch(epochs: dict[tuple[str, int], str]) -> list[tuple[str, int]]:
    """The (run, epoch) keys, oldest epoch first."""
    return sorted(epochs, key=lambda key: (key[1], key[0]))
