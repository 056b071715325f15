"""A token store's life for one dataset: open it, or build it under the store's build lease (or wait for the
process that holds the lease), retry failed builds with backoff, and tell streams when it can serve."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ..errors import Refused, SourceError
from ..pipeline.tokenize import Encoder
from ..progress import Progress, report_every_s
from ..store.format import MANIFEST, StoreDamaged, StoreOutdated, TokenFacts, read_manifest
from ..store.fs import StoreFS
from ..store.lease import HolderInfo, Lease, LeaseLost, has_lease, wait_or_build
from ..store.owner import reclaim
from ..store.reader import TokenStore, open_store
from ..store.retry import BUILD_BACKOFF
from ..store.shard_cache import ShardCache
from .changes import say_why_new
from .local_engine import BuildProgress, SourcePlan, StoreBuilder, build_store, store_inputs

log = logging.getLogger(__name__)


class StoreLifecycle:
    """One dataset's token store, from `pending` to `ready` (or `failed`), as `progress` shows it."""

    def __init__(self, dataset: str, fs: StoreFS, store_dir: str, fingerprint: str, *, encoder: Encoder,
                 plans: Callable[[], list[SourcePlan]], with_prompts: bool,
                 shard_cache: Callable[[], ShardCache | None]) -> None:
        self.dataset, self.fs, self.store_dir, self.fingerprint = dataset, fs, store_dir, fingerprint
        self.encoder, self.plans, self.with_prompts, self.shard_cache = encoder, plans, with_prompts, shard_cache
        self.progress = BuildProgress(state="pending")
        self.store: TokenStore | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._wait: Progress | None = None  # while another process builds: a line every so often, or a bar
        self._said: set[str] = set()  # why the store must be rebuilt, logged once per start
        self._told_why = False  # which files changed since the dataset's previous store: logged once per start

    @property
    def path(self) -> str:
        """Where the token store lives: a local path or a URI."""
        return self.fs.uri(self.store_dir)

    def stored_facts(self) -> TokenFacts | None:
        """Token facts from an existing store's manifest, so a warm start needs no tokenizer."""
        try:
            return read_manifest(self.fs, self.store_dir, self.fingerprint).token_facts
        except StoreDamaged:
            return None

    def prepare(self, on_open: Callable[[TokenStore], None], *, show_bar: bool = True, serve: bool = True,
                build: StoreBuilder = build_store) -> None:
        """Open the token store; if it is missing or damaged, build it with `build` (an engine's build_store)
        under the store's build lease, or wait (state `waiting`) while another process holds the lease and
        builds it. A build that fails with an OSError (disk full, a folder not writable) is retried with
        exponential backoff. `on_open(store)` readies the dataset's serving state before the state is `ready`.
        `serve`: a remote store is opened for reading through the shard cache (`cache build` reads no tokens)."""
        try:
            for attempt in range(1, BUILD_BACKOFF.attempts + 1):
                try:
                    self._prepare_once(show_bar, serve, build)
                    break
                except OSError as err:
                    if attempt == BUILD_BACKOFF.attempts:
                        raise
                    delay = BUILD_BACKOFF.delay(attempt)
                    self.progress.state = "retrying"
                    self.progress.error = BUILD_BACKOFF.describe(attempt, err, delay)
                    log.warning("dataset %s: token store build %s", self.dataset, self.progress.error)
                    time.sleep(delay)
            assert self.store is not None
            on_open(self.store)
            self.progress.state, self.progress.samples = "ready", len(self.store)
            self.progress.tokens, self.progress.error = self.store.manifest.tokens, ""
        except BaseException as err:
            self.progress.state, self.progress.error, self.error = "failed", str(err), err
            raise
        finally:
            self.ready.set()

    def wait_ready(self) -> None:
        """Block until the store can serve. A failed store never serves in this process (its retries are
        spent): Refused (the client stops at once with the server's reason), or SourceError if a bad record
        stopped the build (on_bad_record: fail)."""
        self.ready.wait()
        if self.progress.state == "failed":
            message = (f"dataset {self.dataset!r} cannot serve: its token store failed: {self.progress.error} "
                       "(fix the cause, then restart the server)")
            if isinstance(self.error, SourceError):
                raise SourceError(message)
            raise Refused(message)

    def _prepare_once(self, show_bar: bool, serve: bool, build: StoreBuilder) -> None:
        """One attempt: reclaim what dead builders left, then open the store, or build it if this process wins
        the build lease, or wait for the process that holds it (taken over if that process dies)."""
        if self.fs.is_local:
            reclaim(Path(self.fs.root))
            reclaim(Path(self.store_dir) / "shards")

        def opened() -> bool:
            self.store = self._open(serve=serve)
            return self.store is not None

        if opened():
            return
        if not has_lease(self.path):
            log.warning("dataset %s: no build lease on %s, so this server builds without electing a builder",
                        self.dataset, self.path)
            self._build(show_bar, serve, build, None)
            return
        while True:
            try:
                wait_or_build(self.path, partial(self._build, show_bar, serve, build), opened, on_wait=self._waiting)
                return
            except LeaseLost as err:
                log.warning("dataset %s: %s; waiting for it", self.dataset, err)
            finally:
                self._waited()

    def _build(self, show_bar: bool, serve: bool, build: StoreBuilder, lease: Lease | None) -> None:
        """Build (or finish) the store, stopping if the lease is taken over; then open it."""
        self._waited()
        self.progress.samples = self.progress.tokens = 0  # a retry counts from zero again
        plans = self.plans()
        if not self._told_why:
            self._told_why = True
            say_why_new(self.fs, self.dataset, self.fingerprint, store_inputs(plans), [p.spec for p in plans])
        build(plans, self.encoder, fs=self.fs, store=self.store_dir, fingerprint=self.fingerprint,
              dataset=self.dataset, with_prompts=self.with_prompts, progress=self.progress, show_bar=show_bar,
              check=lease.check if lease is not None else lambda: None)
        self.store = self._open(serve=serve, verify=False)
        if self.fs.is_local:  # a builder killed before this one took its lease over may have left files
            reclaim(Path(self.store_dir) / "shards")

    def _waiting(self, holder: HolderInfo | None) -> None:
        """Another process holds the build lease: say who in GetStats, and in the log when it changes."""
        text = holder.describe() if holder is not None else "waiting for the build lease (just released)"
        if holder is not None and (self.progress.state != "waiting" or holder.label not in self.progress.error):
            log.info("dataset %s: token store %s: %s", self.dataset, self.path, text)
        self.progress.state, self.progress.error = "waiting", text
        self.progress.samples = self.progress.tokens = 0
        self._wait = self._wait or Progress(f"dataset {self.dataset}: token store {self.path}", unit=None,
                                            after_s=report_every_s(), label=f"dataset {self.dataset}")
        self._wait.note(text)

    def _waited(self) -> None:
        """The wait for another builder is over (the store is ready, or this process builds it)."""
        if self._wait is not None:
            self._wait.close()
            self._wait = None

    def _open(self, *, serve: bool, verify: bool = True) -> TokenStore | None:
        """The committed store, or None if there is none or it must be rebuilt (which rewrites only the shards
        that are not complete and valid; a store in place is never deleted). `serve`: a remote store's shards
        are read through the shard cache."""
        if not self.fs.exists(f"{self.store_dir}/{MANIFEST}"):
            return None
        cache = self.shard_cache() if serve and not self.fs.is_local else None
        try:
            return open_store(self.fs, self.store_dir, self.fingerprint, shard_cache=cache, verify=verify)
        except StoreOutdated as err:
            self._say(f"token store format {err.format} at {self.path}: rebuilding")
        except StoreDamaged as err:
            self._say(f"token store damaged, rebuilding: {err}")
        return None

    def _say(self, why: str) -> None:
        """Log why the store is rebuilt once per start: each attempt opens the store more than once (before
        the build lease, again once it holds it, and at each poll while another process rebuilds it)."""
        if why not in self._said:
            self._said.add(why)
            log.warning("%s", why)
