"""A bounded node-local cache of whole shard files fetched from a remote store (any pyarrow filesystem).

`ShardCache(local_dir, max_bytes)` keeps verified copies of `RemoteShard`s (filesystem, path, size, xxh3-64 as
16 hex digits, all from the store's manifest) under `local_dir`, named `<xxh3>-<file name>`:
- `get(shard)` returns the local path, downloading on a miss: in `CHUNK_BYTES` ranged reads (memory stays
  bounded) into a temporary name, checked for size and xxh3-64, then renamed into place. A copy that fails the
  check is fetched once more; a second failure raises `ShardDamaged` (a `SourceError`: DATA_LOSS) naming the
  shard. Threads asking for the same shard at once share one download.
- Storage that fails (a network error, a stall, a restarting S3 server) is tried again with jittered backoff,
  resuming where the download stopped, until it has made no progress for the retry window (retry.py,
  `SIGIL_FEED_STORAGE_RETRY_S`); then `Unavailable` names the shard and the error (the client reconnects and
  resumes). An object that is not there raises `ShardMissing` (DATA_LOSS: rebuild the store).
- A disk that fills while a download is written (ENOSPC, EDQUOT, EFBIG) has unpinned shards evicted, whatever
  the budget, and the download starts again; if none is left to evict, `Unavailable` names the folder. (A
  prefetch gives up instead.)
- `pin(shard)` / `unpin(shard)` (or `with cache.pinned(shard) as path:`) hold a shard in use (a memory map):
  eviction never removes a pinned shard.
- Least recently used unpinned shards are evicted to stay within `max_bytes`. Where pinned shards alone fill
  it, a `get` still succeeds (over budget, with a warning) and the excess goes as soon as they are unpinned.
- Unless that thrashes: readers that cycle over more shards than the budget holds (the ranks' working set is
  larger than the cache) make LRU evict exactly the shard needed next, so every read fetches. When most fetches
  are refetches of shards this cache evicted (`thrashing`), eviction is scan-resistant instead: a shard idle
  for over OVERDUE times its reuse distance (the gets and pins between its last two uses) is done with and goes
  first, oldest first; then the most recently used goes (in a cycle it is needed last, and the optimal policy
  evicts it), and prefetched shards not read yet last. So the cache keeps most of the cycle and fetches only
  what does not fit, instead of all of it on every pass.
- `prefetch(shards)` fetches in the background on a bounded pool of threads, only where they fit without
  going over budget; errors are logged, and the later `get` reports them.
- `stats()` returns `ShardCacheStats` (hits, misses, bytes fetched, evictions, refetches, current bytes, ...) for
  GetStats; `fetched(names)` the bytes fetched for some shards (one store's).
- `on_drop(listener)` tells a listener (held weakly) the name of every shard that leaves the cache, so that a
  reader drops its memory map of the file (an unlinked file that stays mapped keeps its disk space).

The process's one cache per folder, shared by its datasets, is opened and closed by its runtime
(server/runtime.py, `Runtime.shard_cache`).

One process owns a cache folder (an `flock` on `<local_dir>/.lock`, dropped by the kernel when the process dies;
a second process gets a ConfigError naming `dataset.shard_cache_dir`). So at start every partial download is
left over from a dead owner and is removed, and the complete files are kept, in last-use order (their mtimes,
touched on every use), and each is verified (size and xxh3-64) the first time it is asked for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import posixpath
import re
import secrets
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import xxhash

from ..errors import ConfigError, SourceError, Unavailable
from ..progress import QUIET_S, Progress
from .retry import Retries, RetryWindow, storage_retry

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
LOCK = ".lock"
PART = ".part-"
_CACHED = re.compile(r"[0-9a-f]{16}-.+")
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
HISTORY = 4096
"""Evicted shards whose last use the cache remembers (a fetch of one of them is a refetch)."""
THRASH_WEIGHT, THRASH_ON = 1 / 16, 0.5
"""The share of refetches among recent fetches (an exponential average of this weight) above which the cache
evicts by predicted next use rather than least recent use."""
OVERDUE = 2
"""While thrashing: a shard unused for this many times its reuse distance is taken to be done with."""


class ShardDamaged(SourceError):
    """A shard's remote copy failed its size or checksum on two fetches in a row (DATA_LOSS)."""


class ShardMissing(SourceError):
    """A shard's file is not in the store any more (deleted after the store was committed): DATA_LOSS."""


def shard_missing(where: str) -> ShardMissing:
    """The error for a shard file that is not where the store's manifest says, with the fix."""
    return ShardMissing(f"shard {where} is missing from the store (deleted after the store was committed?) (fix: "
                        "rebuild the store: `sigil-feed cache build` with this configuration writes the missing "
                        "shards again)")


class _NoRoom(Exception):
    """A prefetch that would push the cache over its budget (nothing is fetched)."""


class _DiskFull(Exception):
    """Writing a download ran out of room on the cache's disk."""

    def __init__(self, err: OSError) -> None:
        super().__init__(str(err))
        self.err = err


@dataclass(frozen=True)
class RemoteShard:
    """A shard file in a remote store, with its size and xxh3-64 (16 hex digits) from the manifest."""

    fs: pafs.FileSystem
    path: str
    size: int
    xxh3: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{16}", self.xxh3) or self.size < 0:
            raise ValueError(f"{self.path}: xxh3 must be 16 lowercase hex digits and size >= 0")

    @property
    def name(self) -> str:
        """The local file name: its checksum, then the remote file name."""
        return f"{self.xxh3}-{posixpath.basename(self.path)}"

    def describe(self) -> str:
        """The shard's URI, for errors and logs."""
        kind = self.fs.type_name
        return self.path if kind == "local" else f"{kind}://{self.path}"


@dataclass(frozen=True)
class ShardCacheStats:
    """The cache's counters since it was opened, and its size now."""

    hits: int  # get/pin answered from a verified local copy
    misses: int  # get/pin that waited for a download or a verification
    fetches: int  # downloads started (a refetch after a bad checksum counts again)
    bytes_fetched: int
    checksum_failures: int
    evictions: int
    shards: int
    current_bytes: int
    max_bytes: int
    refetches: int = 0  # downloads of shards this cache had evicted (many: the working set does not fit)
    thrashing: bool = False  # most recent fetches are refetches: eviction is scan-resistant

    @property
    def hit_rate(self) -> float:
        """Hits over gets (0 before any)."""
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


@dataclass
class _Entry:
    size: int
    verified: bool  # False: found at start, checked when first asked for
    arrived: int  # the cache's clock (its count of gets and pins) when the shard came in
    pins: int = 0
    used: int | None = None  # the clock at its last get or pin; None: prefetched, not asked for yet
    prior: int | None = None  # the clock at its last use before this cache evicted it, if remembered
    gap: int | None = None  # its reuse distance: clock ticks between its last two uses (None: used once)

    def use(self, now: int) -> None:
        """Record a get or pin at clock `now`."""
        last = self.used if self.used is not None else self.prior
        if last is not None and now > last:
            self.gap = now - last if self.gap is None else max(now - last, (self.gap + now - last) // 2)
        self.used = now if self.used is None else max(self.used, now)


def _free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem of `folder`."""
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def _write_all(out: io.RawIOBase, data: bytes) -> None:
    """Write all of `data` to an unbuffered file (a full disk may take part of a write, then refuse)."""
    view = memoryview(data)
    while view:
        written = out.write(view)
        if not written:
            raise OSError(errno.EIO, "a write to the shard cache took no bytes")
        view = view[written:]


def _closed(src: pa.NativeFile | None) -> None:
    """Close a remote file, if open (its errors do not matter: the read is over, or starts again)."""
    if src is not None:
        with contextlib.suppress(OSError):
            src.close()


def _xxh3_of(path: Path, chunk_bytes: int) -> str:
    digest = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class ShardCache:
    """Whole shard files under `local_dir`, within `max_bytes`, least recently used evicted first (by predicted next
    use while thrashing)."""

    def __init__(self, local_dir: Path | str, max_bytes: int, *, workers: int = 2,
                 chunk_bytes: int = CHUNK_BYTES, retry: RetryWindow | None = None) -> None:
        self.dir, self.max_bytes, self.chunk_bytes = Path(local_dir), max_bytes, chunk_bytes
        self.retry = retry or storage_retry()
        self._stopping = threading.Event()  # set at stop: fetches waiting to retry give up
        self.dir.mkdir(parents=True, exist_ok=True)
        self._owner = self._own()
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._clock = 0  # gets and pins so far
        self._history: OrderedDict[str, int] = OrderedDict()  # evicted shards: the clock at their last use
        self._thrash = 0.0  # exponential average of refetches among fetches
        self._inflight: dict[str, Future[None]] = {}
        self._reserved = 0
        self._counts = dict.fromkeys(("hits", "misses", "fetches", "bytes_fetched", "checksum_failures",
                                      "evictions", "current_bytes", "refetches"), 0)
        self._fetched_by: Counter[str] = Counter()
        self._listeners: list[weakref.WeakMethod[Callable[[str], None]]] = []
        self._adopt()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-prefetch")
        self._prefetch_stopped = False

    def _own(self) -> int:
        """Lock the folder for this process; ConfigError if another holds it."""
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CacheInUse(f"{self.dir} is in use by another process (PID {other})", key="dataset.shard_cache_dir",
                             fix="give each server its own shard cache folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd

    def _adopt(self) -> None:
        """Remove partial downloads; keep complete files (to verify on first use), oldest use first."""
        found = []
        for path in self.dir.iterdir():
            if PART in path.name:
                path.unlink(missing_ok=True)
                log.info("removed a partial shard download %s", path)
            elif _CACHED.fullmatch(path.name) and path.is_file():
                stat = path.stat()
                found.append((stat.st_mtime, path.name, stat.st_size))
        for age, (_, name, size) in enumerate(sorted(found), start=-len(found)):
            self._entries[name] = _Entry(size, verified=False, arrived=age)
            self._counts["current_bytes"] += size
        with self._lock:
            self._evict(0)

    @property
    def thrashing(self) -> bool:
        """Whether most recent fetches were refetches of evicted shards (eviction then goes by predicted use)."""
        return self._thrash >= THRASH_ON

    def _victims(self) -> list[str]:
        """The unpinned shards in the order they are evicted: least recently used first, or while thrashing, those
        done with (idle past OVERDUE reuse distances) oldest first, then the most recently used first, prefetched
        ones not read yet last (see the module's docstring). Under the lock."""
        unpinned = [(name, entry) for name, entry in self._entries.items() if not entry.pins]
        if not self.thrashing:
            return [name for name, _ in unpinned]
        gaps = sorted(entry.gap for entry in self._entries.values() if entry.gap is not None)
        typical = gaps[len(gaps) // 2] if gaps else None
        now = self._clock

        def order(item: tuple[str, _Entry]) -> tuple[int, int]:
            entry = item[1]
            last = entry.used if entry.used is not None else entry.arrived
            gap = entry.gap if entry.gap is not None else typical
            if gap is None or now - last > OVERDUE * gap:
                return 0, last  # done with: the oldest first
            if entry.used is None:
                return 2, last  # prefetched and not read yet: wanted soon, so last
            return 1, -last  # in the cycle: the most recently used is needed last

        return [name for name, _ in sorted(unpinned, key=order)]

    def _evict(self, needed: int) -> bool:
        """Evict unpinned shards (in `_victims` order) until `needed` more bytes fit; whether they do."""
        if self._counts["current_bytes"] + self._reserved + needed <= self.max_bytes:
            return True
        for name in self._victims():
            if self._counts["current_bytes"] + self._reserved + needed <= self.max_bytes:
                break
            self._remove(name)
        return self._counts["current_bytes"] + self._reserved + needed <= self.max_bytes

    def _evict_for_disk(self, needed: int) -> int:
        """Evict unpinned shards (in `_victims` order) whatever the budget, until the disk has `needed` bytes free
        (at least one, if any); how many went."""
        evicted = 0
        for name in self._victims():
            if evicted and _free_bytes(self.dir) >= needed:
                break
            self._remove(name)
            evicted += 1
        return evicted

    def _remove(self, name: str) -> None:
        """Evict one unpinned shard: its listeners are told, then its file goes (under the lock)."""
        entry = self._entries.pop(name)
        self._dropped(name)
        (self.dir / name).unlink(missing_ok=True)
        self._counts["current_bytes"] -= entry.size
        self._counts["evictions"] += 1
        last = entry.used if entry.used is not None else entry.prior
        if last is not None:
            self._history[name] = last
            self._history.move_to_end(name)
            while len(self._history) > HISTORY:
                self._history.popitem(last=False)
        log.debug("evicted shard %s (%d bytes)", name, entry.size)

    def get(self, shard: RemoteShard) -> Path:
        """The local path of a verified copy of the shard, fetched if needed (not pinned: may be evicted later)."""
        return self._ensure(shard, pin=False, count=True)

    def pin(self, shard: RemoteShard) -> Path:
        """Like get, and the shard is not evicted until as many unpin calls."""
        return self._ensure(shard, pin=True, count=True)

    def unpin(self, shard: RemoteShard) -> None:
        """Release one pin; the cache shrinks back within budget if pins held it over."""
        with self._lock:
            entry = self._entries.get(shard.name)
            if entry is None or entry.pins == 0:
                raise ValueError(f"shard {shard.describe()} is not pinned")
            entry.pins -= 1
            self._evict(0)

    @contextlib.contextmanager
    def pinned(self, shard: RemoteShard) -> Iterator[Path]:
        """The shard's local path, pinned for the block."""
        path = self.pin(shard)
        try:
            yield path
        finally:
            self.unpin(shard)

    def prefetch(self, shards: Iterable[RemoteShard]) -> list[Future[None]]:
        """Fetch these shards in the background, in order (those cached or on their way are skipped); the
        futures of those queued, which end when each is cached or given up (errors are logged, not raised)."""
        queued: dict[str, Future[None]] = {}
        for shard in shards:
            if self._prefetch_stopped:
                break
            with self._lock:
                entry = self._entries.get(shard.name)
                if shard.name in queued or shard.name in self._inflight or (entry is not None and entry.verified):
                    continue
            queued[shard.name] = self._pool.submit(self._prefetch_one, shard)
        return list(queued.values())

    def _prefetch_one(self, shard: RemoteShard) -> None:
        try:
            self._ensure(shard, pin=False, count=False, prefetch=True)
        except _NoRoom:
            log.debug("not prefetching %s: no room in the shard cache's budget or on its disk", shard.describe())
        except Exception as err:
            log.warning("prefetching shard %s failed: %s", shard.describe(), err)

    def _ensure(self, shard: RemoteShard, *, pin: bool, count: bool, prefetch: bool = False) -> Path:
        name, path, found = shard.name, self.dir / shard.name, None
        used: int | None = None  # the clock of this get or pin (None: a prefetch)
        while True:
            with self._lock:
                if count:
                    self._clock += 1
                    used = self._clock
                entry = self._entries.get(name)
                if entry is not None and entry.verified and self._touch(name):
                    self._entries.move_to_end(name)
                    entry.pins += pin
                    if used is not None:
                        entry.use(used)
                    self._counts["hits"] += count
                    return path
                self._counts["misses"] += count
                count = False
                future = self._inflight.get(name)
                mine = future is None
                if future is None:
                    future = self._inflight[name] = Future()
                    found = self._entries.pop(name, None)  # from an earlier run: verify before use
                    self._counts["current_bytes"] -= found.size if found else 0
            if mine:
                return self._fill(shard, future, reuse=found is not None, pin=pin, prefetch=prefetch, used=used)
            with contextlib.suppress(_NoRoom):  # a prefetch gave up for room: fetch it ourselves
                future.result()

    def _touch(self, name: str) -> bool:
        """Record a use in the file's mtime (kept across restarts); False if the file has gone."""
        try:
            os.utime(self.dir / name)
            return True
        except FileNotFoundError:
            entry = self._entries.pop(name)
            self._dropped(name)
            self._counts["current_bytes"] -= entry.size
            return False

    def on_drop(self, listener: Callable[[str], None]) -> None:
        """Call this bound method (held weakly) with the name of every shard that leaves the cache, before its
        file goes; it runs under the cache's lock, so it must not call the cache."""
        with self._lock:
            self._listeners.append(weakref.WeakMethod(listener))  # type: ignore[arg-type]

    def _dropped(self, name: str) -> None:
        """Tell the live listeners that a shard left the cache (called under the lock)."""
        live = []
        for ref in self._listeners:
            listener = ref()
            if listener is not None:
                listener(name)
                live.append(ref)
        self._listeners = live

    def _fill(self, shard: RemoteShard, future: Future[None], *, reuse: bool, pin: bool, prefetch: bool,
              used: int | None) -> Path:
        """Verify the copy from an earlier run, or download the shard; then enter it, pinned if asked (`used`: the
        clock of the get or pin that asked, None for a prefetch)."""
        path = self.dir / shard.name
        try:
            if not (reuse and self._intact(path, shard)):
                with self._lock:
                    refetch = shard.name in self._history
                    self._counts["refetches"] += refetch
                    self._thrash += THRASH_WEIGHT * (refetch - self._thrash)
                self._download(shard, path, prefetch=prefetch)
            with self._lock:
                entry = _Entry(shard.size, verified=True, arrived=self._clock, pins=int(pin),
                               prior=self._history.pop(shard.name, None))
                if used is not None:
                    entry.use(used)
                self._entries[shard.name] = entry
                self._counts["current_bytes"] += shard.size
                del self._inflight[shard.name]
            future.set_result(None)
            return path
        except BaseException as err:
            with self._lock:
                del self._inflight[shard.name]
            future.set_exception(err)
            raise

    def _intact(self, path: Path, shard: RemoteShard) -> bool:
        """Whether a local copy has the shard's size and checksum (a bad one is removed)."""
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == shard.size and _xxh3_of(path, self.chunk_bytes) == shard.xxh3:
                return True
            log.warning("cached copy of shard %s is damaged; fetching it again", shard.describe())
            path.unlink()
        return False

    def _download(self, shard: RemoteShard, path: Path, *, prefetch: bool) -> None:
        """Fetch the shard into place, once more if the first copy is bad; ShardDamaged after two."""
        with self._lock:
            if not self._evict(shard.size):
                if prefetch:
                    raise _NoRoom
                log.warning("shard cache %s goes over its %d bytes: the shards in use fill it", self.dir,
                            self.max_bytes)
            self._reserved += shard.size
        try:
            problems: list[str] = []
            while len(problems) < 2:
                try:
                    problem = self._fetch_once(shard, path)
                except _DiskFull as full:
                    if prefetch:  # a guess at what is read next never pushes out what is cached
                        raise _NoRoom from full.err
                    self._make_room(shard, full.err)
                    continue
                if problem is None:
                    return
                problems.append(problem)
                with self._lock:
                    self._counts["checksum_failures"] += 1
                log.warning("shard %s failed its check (%s)", shard.describe(), problem)
            raise ShardDamaged(f"shard {shard.describe()} failed its checksum on two fetches: expected "
                               f"{shard.size} bytes with xxh3 {shard.xxh3}, got {' then '.join(problems)}")
        finally:
            with self._lock:
                self._reserved -= shard.size

    def _make_room(self, shard: RemoteShard, err: OSError) -> None:
        """The disk filled while the shard was written: evict unpinned shards to make room for it, whatever the
        budget; Unavailable naming the folder if there are none left."""
        with self._lock:
            evicted = self._evict_for_disk(shard.size)
        if not evicted:
            raise Unavailable(f"no room to fetch shard {shard.describe()} ({shard.size} bytes) into the shard cache "
                              f"{self.dir}: {err.strerror}, and every shard it holds is in use (fix: free space "
                              f"there, or lower dataset.shard_cache_gb to what its disk holds)") from err
        log.warning("shard cache %s: its disk is full (%s): evicted %d shards to fetch %s", self.dir, err.strerror,
                    evicted, shard.describe())

    @contextlib.contextmanager
    def _writing(self, shard: RemoteShard) -> Iterator[None]:
        """Local writes of a download: a full disk raises _DiskFull, any other failure Unavailable naming the folder."""
        try:
            yield
        except OSError as err:
            if err.errno in _NO_ROOM:
                raise _DiskFull(err) from err
            raise Unavailable(f"shard cache {self.dir}: cannot write shard {shard.describe()}: {err}") from err

    def _fetch_once(self, shard: RemoteShard, path: Path) -> str | None:
        """Download into a temporary name, check, rename into place; None, or what was wrong. A read that fails
        is tried again from where it stopped (see the module's docstring)."""
        part = path.with_name(f".{path.name}{PART}{secrets.token_hex(4)}")
        digest, got = xxhash.xxh3_64(), 0
        with self._lock:
            self._counts["fetches"] += 1
        retries = self.retry.start(self._stopping)
        src: pa.NativeFile | None = None
        try:
            with self._writing(shard):
                out = part.open("wb", buffering=0)
            with out, Progress(f"fetching shard {shard.describe()}", total=shard.size, after_s=QUIET_S) as report:
                while got <= shard.size:  # one byte past the size tells a longer file
                    try:
                        if src is None:
                            src = shard.fs.open_input_file(shard.path)
                            src.seek(got)
                        chunk = src.read(min(self.chunk_bytes, shard.size + 1 - got))
                    except FileNotFoundError:
                        raise shard_missing(shard.describe()) from None
                    except OSError as err:
                        _closed(src)
                        src = None
                        self._retry_or_give_up(shard, retries, err)
                        continue
                    if not chunk:
                        break
                    retries.progressed()
                    with self._writing(shard):
                        _write_all(out, chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    with self._lock:
                        self._counts["bytes_fetched"] += len(chunk)
                        self._fetched_by[shard.name] += len(chunk)
                    report.at(got)
            if got != shard.size or digest.hexdigest() != shard.xxh3:
                return f"{got}{'+' if got > shard.size else ''} bytes with xxh3 {digest.hexdigest()}"
            with self._writing(shard):
                os.replace(part, path)
            return None
        finally:
            _closed(src)
            part.unlink(missing_ok=True)

    def _retry_or_give_up(self, shard: RemoteShard, retries: Retries, err: OSError) -> None:
        """After a failed read of the shard: wait for the next try, or raise Unavailable naming the shard."""
        if not retries.wait():
            raise Unavailable(f"cannot fetch shard {shard.describe()}: {type(err).__name__}: {err}; "
                              f"{retries.describe()}") from err
        log.warning("fetching shard %s failed (%s: %s); trying again (%d failed attempts, %.0f s without progress)",
                    shard.describe(), type(err).__name__, err, retries.failures, retries.stalled_s)

    def stats(self) -> ShardCacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return ShardCacheStats(shards=len(self._entries), max_bytes=self.max_bytes, thrashing=self.thrashing,
                                   **self._counts)

    def fetched(self, names: Iterable[str]) -> int:
        """Bytes downloaded for these shards (by `RemoteShard.name`) since the cache was opened, refetches included."""
        with self._lock:
            return sum(self._fetched_by[name] for name in set(names))

    def stop_prefetch(self) -> None:
        """Drop the queued prefetches and take no more (downloads under way finish, but give up at once if they
        wait for storage to come back): a stopping server's exit does not wait for shards nobody will read."""
        self._prefetch_stopped = True
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stop prefetching (waiting for downloads under way) and give up the folder."""
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._owner >= 0:
            os.close(self._owner)
            self._owner = -1

    def __enter__(self) -> ShardCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SLOTS = 64  # servers on one host that may share a default shard cache location at once


class CacheInUse(ConfigError):
    """The shard cache folder is locked by another live process."""


def first_free_slot(root: Path, max_bytes: int) -> ShardCache:
    """The cache in `root/0`, or the next numbered folder another server does not hold: a restarted server takes
    its old slot back (and its shards), a concurrent one gets its own."""
    for slot in range(SLOTS):
        try:
            return ShardCache(root / str(slot), max_bytes)
        except CacheInUse:
            continue
    raise CacheInUse(f"all {SLOTS} shard cache slots under {root} are in use", key="dataset.shard_cache_dir",
                     fix="set dataset.shard_cache_dir for each server")
