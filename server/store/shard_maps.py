"""A store's shard token arrays, memory-mapped: where they lie (a local store), or from the node-local shard
cache (a remote store), each shard pinned while a batch reads it and its map dropped when the cache evicts it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

from .format import Manifest, shard_paths
from .fs import StoreFS
from .shard_cache import RemoteShard, ShardCache, shard_missing

PREFETCH_SHARDS = 4
"""How many upcoming shards a stream asks the cache to fetch ahead (those that fit in its budget)."""


class ShardMaps:
    """Each shard's token ids as a numpy array over a memory map, opened on first use."""

    def __init__(self, fs: StoreFS, store: str, manifest: Manifest, cache: ShardCache | None) -> None:
        self.fs, self.cache = fs, cache
        self.dtype = np.dtype(manifest.dtype)
        self.paths = [shard_paths(store, facts.name)[0] for facts in manifest.shards]
        self.empty = [facts.tokens == 0 for facts in manifest.shards]
        self.remote = [RemoteShard(fs.fs, path, facts.tokens_file.size, facts.tokens_file.xxh3)
                       for path, facts in zip(self.paths, manifest.shards, strict=True)]
        self._index = {shard.name: i for i, shard in enumerate(self.remote)}
        self._maps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        if cache is not None:
            cache.on_drop(self._dropped)

    @property
    def local(self) -> bool:
        """Whether the shards are mapped where they lie (no cache, nothing to fetch)."""
        return self.fs.is_local

    def _map(self, index: int, path: Path) -> np.ndarray:
        tokens = self._maps.get(index)
        if tokens is None:
            with self._lock:
                tokens = self._maps.get(index)
                if tokens is None:
                    tokens = np.zeros(0, dtype=self.dtype) if self.empty[index] else self._open(index, path)
                    self._maps[index] = tokens
        return tokens

    def _open(self, index: int, path: Path) -> np.ndarray:
        """A shard's tokens mapped from its file; ShardMissing (DATA_LOSS) if a local store's file has gone."""
        try:
            return np.asarray(np.memmap(path, dtype=self.dtype, mode="r"))
        except FileNotFoundError:
            if not self.local:
                raise  # the cache's copy, pinned: not for the reader to explain
            raise shard_missing(str(path)) from None

    def _dropped(self, name: str) -> None:
        """The cache evicted a shard: forget its map (unpinned, so no batch is reading it)."""
        index = self._index.get(name)
        if index is not None:
            with self._lock:
                self._maps.pop(index, None)

    @contextlib.contextmanager
    def pinned(self, indices: Collection[int]) -> Iterator[dict[int, np.ndarray]]:
        """These shards' token arrays, held for the block: a remote store's are fetched if missing and kept from
        eviction until the block ends; use the arrays only inside it."""
        if self.local:
            maps = self._maps
            yield {i: maps[i] if i in maps else self._map(i, self.fs.local_path(self.paths[i])) for i in indices}
            return
        if self.cache is None:
            raise RuntimeError(f"the store at {self.fs.location} is remote: it is read through a shard cache")
        cache, held = self.cache, []
        try:
            tokens = {}
            for i in indices:
                path = cache.pin(self.remote[i])
                held.append(i)
                tokens[i] = self._map(i, path)
            yield tokens
        finally:
            for i in held:
                cache.unpin(self.remote[i])

    def prefetch(self, upcoming: np.ndarray) -> None:
        """Fetch ahead the first PREFETCH_SHARDS distinct shards of `upcoming` (the shards of the samples a
        stream reads next, in order); nothing for a local store."""
        if self.local or self.cache is None or not len(upcoming):
            return
        shards, first = np.unique(upcoming, return_index=True)
        ahead = shards[np.argsort(first)][:PREFETCH_SHARDS].tolist()
        self.cache.prefetch(self.remote[i] for i in ahead)

    def bytes_fetched(self) -> int:
        """Bytes of this store's shards the cache downloaded (refetches included)."""
        return 0 if self.cache is None else self.cache.fetched(s.name for s in self.remote)
