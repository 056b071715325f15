"""The process's shared resources, owned by one object: created at start, passed down, closed at stop.

A `Runtime` holds the thread pools the data path shares (streaming mode's encode and block-read pools, cached
mode's epoch-layout pool) and the node-local shard caches, one per folder, that the datasets of the process
share. The server (rpc/app.py) and `sigil-feed cache build` (cli/cache.py) each open one (`with Runtime() as
runtime:`) and hand it to the datasets they open; closing it drops the work nobody will wait for, waits for the
work under way, and gives up the shard cache folders, so that no thread of it outlives its owner.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import ConfigError
from .store.shard_cache import ShardCache, first_free_slot

ENCODE_WORKERS = 8
"""Streaming mode: blocks encoding at once (the Rust tokenizer releases the GIL and is parallel itself)."""
READ_WORKERS = 32
"""Streaming mode: blocks read ahead at once (one per rank stream at most)."""
LAYOUT_WORKERS = 1
"""Cached mode: epoch layouts computed at once (the next epoch's, in the background)."""


class Runtime:
    """The pools and shard caches of one process (a server, or a `cache build`); a context manager."""

    def __init__(self) -> None:
        self.encode_pool = ThreadPoolExecutor(ENCODE_WORKERS, thread_name_prefix="encode")
        self.read_pool = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="block-read")
        self.layout_pool = ThreadPoolExecutor(LAYOUT_WORKERS, thread_name_prefix="layout")
        self._shard_caches: dict[Path, ShardCache] = {}
        self._lock = threading.Lock()
        self._closed = False

    def shard_cache(self, local_dir: Path | str, max_bytes: int, *, any_slot: bool = False) -> ShardCache:
        """The one cache for a folder, opened on first use; ConfigError if asked again with another budget.
        `any_slot` (the default location): a numbered subfolder no other live server holds."""
        key = Path(local_dir).expanduser().absolute()
        with self._lock:
            if self._closed:
                raise RuntimeError("the runtime is closed")
            cache = self._shard_caches.get(key)
            if cache is None:
                cache = self._shard_caches[key] = (first_free_slot(key, max_bytes) if any_slot
                                                   else ShardCache(key, max_bytes))
            elif cache.max_bytes != max_bytes:
                raise ConfigError(f"datasets share the shard cache {key} with different budgets ({cache.max_bytes} "
                                  f"and {max_bytes} bytes)", key="dataset.shard_cache_gb",
                                  fix="give them the same shard_cache_gb, or each its own shard_cache_dir")
        return cache

    def close(self) -> None:
        """Stop: drop queued prefetches, reads, encodings and layouts, wait for those under way (a read or an
        encoding dropped before it ran fails whoever waits for it), and give up the shard cache folders."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            caches = list(self._shard_caches.values())
        for cache in caches:
            cache.stop_prefetch()
        for pool in (self.read_pool, self.encode_pool, self.layout_pool):  # a read may submit its encoding
            pool.shutdown(wait=True, cancel_futures=True)
        for cache in caches:
            cache.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
