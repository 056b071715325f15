"""A remote store's shards read through the shard cache: pinned while read, maps dropped on eviction, refetched
alike, damage named; the process's one cache per folder."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from fsspec.implementations.local import LocalFileSystem

from sigil_feed.server.store.format import shard_paths
from sigil_feed.server.store.fs import StoreFS
from sigil_feed.server.store.reader import TokenStore, open_store
from sigil_feed.server.store.shard_cache import ShardCache, ShardDamaged
from tests.unit.test_store import FP, make_store

WANT = [[0, 1, 2], [1, 2, 3], [2, 3, 4]]


def remote_view(fs: StoreFS) -> StoreFS:
    """The same files through a pyarrow filesystem that is not LocalFileSystem: read as a remote store."""
    return StoreFS(pafs.PyFileSystem(pafs.FSSpecHandler(LocalFileSystem())), fs.root, "remote://" + fs.root)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ShardCache]:
    """Room for the first shard's tokens (12 bytes) only: reading the second evicts the first."""
    with ShardCache(tmp_path / "shard-cache", 12) as opened:
        yield opened


def samples(store: TokenStore) -> list[list[int]]:
    indices = sorted(set(store.shard.tolist()))
    with store.shards.pinned(indices) as tokens:
        return [tokens[s][o:o + n].tolist() for s, o, n in zip(store.shard, store.offsets, store.lengths, strict=True)]


def test_a_remote_store_is_read_through_the_cache_and_an_evicted_shard_is_unmapped(tmp_path: Path,
                                                                                   cache: ShardCache) -> None:
    fs, path = make_store(tmp_path / "store")
    store = open_store(remote_view(fs), path, FP, shard_cache=cache)
    index = store.manifest.samples_index
    assert not store.shards.local and index is not None and store.samples_bytes_read == index.file.size
    with store.shards.pinned([0]) as tokens:
        first = tokens[0]
        assert first[:6].tolist() == [0, 1, 2, 1, 2, 3]
    assert 0 in store.shards._maps
    with store.shards.pinned([1]) as tokens:  # no room for both: shard 0 goes, and its map with it
        assert tokens[1].tolist() == [2, 3, 4]
    assert 0 not in store.shards._maps and cache.stats().evictions == 1
    del first
    gc.collect()
    assert samples(store) == WANT  # both pinned at once: over budget while in use; both refetched alike
    stats = cache.stats()
    assert (stats.fetches, stats.misses, stats.evictions, stats.current_bytes) == (4, 4, 3, 6)
    assert store.bytes_fetched() == store.samples_bytes_read + 2 * (12 + 6)


def test_prefetch_fetches_the_next_shards_in_order_of_use(tmp_path: Path) -> None:
    fs, path = make_store(tmp_path / "store")
    with ShardCache(tmp_path / "shard-cache", 1000) as cache:
        store = open_store(remote_view(fs), path, FP, shard_cache=cache)
        store.shards.prefetch(np.array([1, 1, 0]))
        deadline = time.monotonic() + 30
        while cache.stats().fetches < 2 and time.monotonic() < deadline:  # close() drops prefetches not started
            time.sleep(0.01)
        cache.close()  # waits for the downloads under way
        assert cache.stats().fetches == 2 and cache.stats().current_bytes == 18


def test_a_remote_shard_failing_its_checksum_twice_is_named(tmp_path: Path, cache: ShardCache) -> None:
    fs, path = make_store(tmp_path / "store")
    store = open_store(remote_view(fs), path, FP, shard_cache=cache)
    tokens_file = Path(shard_paths(path, store.manifest.shards[1].name)[0])
    tokens_file.write_bytes(bytes(reversed(tokens_file.read_bytes())))
    with pytest.raises(ShardDamaged, match=f"shard .*/{tokens_file.name} failed its checksum on two"), \
            store.shards.pinned([1]):
        pass


def test_a_remote_store_without_a_cache_reads_no_tokens(tmp_path: Path) -> None:
    fs, path = make_store(tmp_path / "store")
    store = open_store(remote_view(fs), path, FP)
    assert len(store) == 3  # its samples tables are read; cache build needs no more
    with pytest.raises(RuntimeError, match="read through a shard cache"), store.shards.pinned([0]):
        pass
