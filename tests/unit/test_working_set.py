"""The working set of a sidecar's ranks: which virtual ranks and shards they read in an epoch, and the most shard
bytes they read at once, checked against what the ranks' packers really pin, replayed through a real shard cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest
import xxhash

from sigil_feed.server.cached.layout import digit_reversal, rank_regions
from sigil_feed.server.cached.working_set import virtual_ranks_read, working_set
from sigil_feed.server.rows.deal import node_order
from sigil_feed.server.store import shard_cache
from sigil_feed.server.store.shard_cache import RemoteShard, ShardCache
from tests.unit.cached_store import fake_store, layout_of, packer


def test_ranks_read_the_virtual_ranks_of_their_residue() -> None:
    node = node_order(8, 48)  # node-aware: rank r takes the class sigma(r), the r-th run of regions
    assert node is not None and virtual_ranks_read(48, 8, [0, 1]).tolist() == [v for v in range(48)
                                                                            if v % 8 in node[:2].tolist()]
    for world, local in ((8, 2), (16, 8), (48, 4)):
        for first in range(0, world, local):  # a node's consecutive ranks: the regions rank_regions says
            ranks = range(first, first + local)
            want = np.unique(np.concatenate(rank_regions(48, world)[first:first + local]))
            assert np.array_equal(np.sort(digit_reversal(48)[virtual_ranks_read(48, world, ranks)]), want)
    assert virtual_ranks_read(48, 24, [1]).tolist() == [1, 25]  # plain deal: 24 is no prefix product of 48's
    assert virtual_ranks_read(48, 5, [3]).tolist() == list(range(48))  # gcd 1: every rank reads every one
    assert virtual_ranks_read(48, 64, [0, 16]).tolist() == list(range(0, 48, 16))  # gcd 16


def epoch_pins(store: Any, layout: Any, world: int, ranks: range, *, batch: int, seq: int,
               pack: bool) -> list[list[int]]:
    """The shards each batch of these ranks pins over the epoch, step after step (as one sidecar cuts them)."""
    packers = [packer(store, layout, r, world, batch, seq, pack, "drop") for r in ranks]
    pins: list[list[int]] = []
    while True:
        cut = False
        for p in packers:
            if p.next_batch() is not None:
                pins.append(store.shards.pinned_log[-1])
                cut = True
        if not cut:
            return pins


def scenario(shards: int, per_shard: int, virtual: int, seed: int = 0, pack: bool = True) -> tuple[Any, Any,
                                                                                                   np.ndarray]:
    lengths = np.random.default_rng(seed).integers(20, 200, shards * per_shard).tolist()
    store = fake_store(lengths, per_shard)
    layout = layout_of(store, virtual, window=4, pack=pack)
    return store, layout, np.array([len(t) * 4 for t in store.shards.tokens], dtype=np.int64)  # int32 ids


@pytest.mark.parametrize(("world", "ranks", "pack"), [(8, range(2), True), (8, range(4), False), (5, range(2), True),
                                                      (16, range(8), True)])
def test_the_working_set_holds_the_shards_the_ranks_pin(world: int, ranks: range, pack: bool) -> None:
    store, layout, sizes = scenario(64, 50, 48, pack=pack)
    pinned = {s for batch in epoch_pins(store, layout, world, ranks, batch=4, seq=256, pack=pack) for s in batch}
    need = working_set(layout, store.shard, sizes, world_size=world, ranks=ranks, pack=pack)
    read = set(store.shard[layout.items[np.concatenate([
        np.arange(layout.bounds[q], layout.bounds[q + 1]) for q in layout.region[virtual_ranks_read(48, world, ranks)]
    ])]].tolist())
    assert pinned <= read and need.shards == len(read)  # `drop` may leave a region's last items unread
    assert need.epoch_bytes == sizes[sorted(read)].sum() and 0 < need.peak_bytes <= need.epoch_bytes
    assert need.virtual == len(virtual_ranks_read(48, world, ranks))
    if world == 5:
        assert need.shards == 64  # a world size prime to V: every rank reads the whole store


def replay(pins: list[list[int]], sizes: np.ndarray, budget: int, folder: Path) -> shard_cache.ShardCacheStats:
    """The batches' pins through a real shard cache of `budget` bytes over local files of these sizes."""
    (folder / "remote").mkdir(parents=True)
    shards = []
    for i, size in enumerate(sizes.tolist()):
        data = bytes([i % 251]) * size
        (folder / "remote" / f"s{i}.bin").write_bytes(data)
        shards.append(RemoteShard(pafs.LocalFileSystem(), str(folder / "remote" / f"s{i}.bin"), size,
                                  xxhash.xxh3_64_hexdigest(data)))
    with ShardCache(folder / "cache", budget) as cache:
        for batch in pins:
            for i in batch:
                cache.pin(shards[i])
            for i in batch:
                cache.unpin(shards[i])
        return cache.stats()


def test_a_cache_of_the_working_set_fetches_each_shard_once_and_a_smaller_one_refetches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks 0-7 of 16 with V = 48 (a sidecar of 8 of 16 GPUs, half the store): with a shard cache of 1.5x the
    working set they fetch each shard they read once; with half of it they refetch, LRU many times over (the
    thrash the warning is for: 16x their share here), the scan-resistant order less (11x; the optimal offline
    order, 10x)."""
    store, layout, sizes = scenario(64, 200, 48)
    pins = epoch_pins(store, layout, 16, range(8), batch=4, seq=1024, pack=True)
    need = working_set(layout, store.shard, sizes, world_size=16, ranks=range(8), pack=True)
    assert need.peak_bytes < 0.9 * need.epoch_bytes  # the ranks move through their share
    roomy = replay(pins, sizes, int(1.5 * need.peak_bytes), tmp_path / "roomy")
    assert roomy.bytes_fetched <= need.epoch_bytes and roomy.refetches == 0
    small = replay(pins, sizes, need.peak_bytes // 2, tmp_path / "small")
    monkeypatch.setattr(shard_cache, "THRASH_ON", 2.0)  # plain LRU
    lru = replay(pins, sizes, need.peak_bytes // 2, tmp_path / "lru")
    assert lru.bytes_fetched > 10 * need.epoch_bytes and small.thrashing
    assert need.epoch_bytes < small.bytes_fetched < 0.75 * lru.bytes_fetched
