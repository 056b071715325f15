"""The shard cache's eviction order when readers cycle over more shards than it holds (the ranks' working set is
larger than the budget): LRU would fetch every shard on every pass; the cache notices the refetches and keeps
most of the cycle, fetching about what does not fit. Real caches over a local folder and a moto S3 bucket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import xxhash

from sigil_feed.server.store import shard_cache
from sigil_feed.server.store.shard_cache import RemoteShard, ShardCache

SIZE = 2000  # bytes per shard
N = 8  # shards in the cycle
BUDGET = N // 2  # shards the cache holds
PASSES = 8


def put_shards(fs: pafs.FileSystem, base: str, count: int, first: int = 0) -> list[RemoteShard]:
    shards = []
    for i in range(first, first + count):
        data = bytes((i * 37 + k) % 251 for k in range(SIZE))
        with fs.open_output_stream(f"{base}/s{i}.bin") as out:
            out.write(data)
        shards.append(RemoteShard(fs, f"{base}/s{i}.bin", SIZE, xxhash.xxh3_64_hexdigest(data)))
    return shards


@pytest.fixture(params=["local", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[pafs.FileSystem, str]:
    """Where the shards live: a local folder, or a bucket on the moto server (pyarrow's S3 client)."""
    if request.param == "local":
        (tmp_path / "remote").mkdir()
        return pafs.LocalFileSystem(), str(tmp_path / "remote")
    bucket = request.getfixturevalue("s3_bucket").removeprefix("s3://")
    fs = pafs.S3FileSystem(endpoint_override=request.getfixturevalue("s3_endpoint").split("://")[1], scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    return fs, f"{bucket}/store/shards"


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ShardCache]:
    with ShardCache(tmp_path / "cache", BUDGET * SIZE, chunk_bytes=1000) as opened:
        yield opened


def cycle(cache: ShardCache, shards: list[RemoteShard], passes: int) -> list[int]:
    """Read the shards in order, `passes` times, each pinned while read (as a batch does); the shards fetched per
    pass."""
    fetched = []
    for _ in range(passes):
        before = cache.stats().bytes_fetched
        for shard in shards:
            with cache.pinned(shard) as path:
                assert path.stat().st_size == SIZE
        fetched.append((cache.stats().bytes_fetched - before) // SIZE)
    return fetched


def test_a_cycle_over_twice_the_budget_fetches_what_does_not_fit_not_everything(
        remote: tuple[pafs.FileSystem, str], cache: ShardCache) -> None:
    shards = put_shards(*remote, N)
    fetched = cycle(cache, shards, PASSES)
    assert fetched[:2] == [N, N]  # cold, then LRU's refetches of everything, which show the thrashing
    # From then on each pass fetches about what the budget cannot hold (N - BUDGET, plus the one slot that turns
    # over), where LRU fetches all N on every pass (next test).
    assert fetched[2] < N and max(fetched[3:]) <= N - BUDGET + 1, fetched
    assert sum(fetched[3:]) <= (PASSES - 3) * (N - BUDGET + 1) < (PASSES - 3) * N
    stats = cache.stats()
    assert stats.thrashing and stats.refetches == sum(fetched) - N and stats.current_bytes <= BUDGET * SIZE


def test_lru_on_the_same_cycle_fetches_every_shard_every_pass(tmp_path: Path, cache: ShardCache,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst case the policy avoids (least recently used, always: the shard evicted is the one needed next)."""
    monkeypatch.setattr(shard_cache, "THRASH_ON", 2.0)  # never thrashing: plain LRU
    (tmp_path / "remote").mkdir()
    assert cycle(cache, put_shards(pafs.LocalFileSystem(), str(tmp_path / "remote"), N), PASSES) == [N] * PASSES


def test_a_cycle_that_fits_is_fetched_once_and_stays_lru(tmp_path: Path, cache: ShardCache) -> None:
    (tmp_path / "remote").mkdir()
    shards = put_shards(pafs.LocalFileSystem(), str(tmp_path / "remote"), BUDGET)
    assert cycle(cache, shards, PASSES) == [BUDGET] + [0] * (PASSES - 1)
    stats = cache.stats()
    assert not stats.thrashing and stats.refetches == 0 and stats.evictions == 0


def test_after_thrashing_the_shards_done_with_go(tmp_path: Path, cache: ShardCache) -> None:
    """Readers that move on from a cycle too large to a set that fits: the old cycle's shards count as done with
    once idle for OVERDUE times their reuse distance, and go; from then on the new set stays."""
    (tmp_path / "remote").mkdir()
    fs, base = pafs.LocalFileSystem(), str(tmp_path / "remote")
    old, new = put_shards(fs, base, N), put_shards(fs, base, BUDGET - 1, first=N)
    cycle(cache, old, PASSES)
    assert cache.thrashing
    fetched = cycle(cache, new, 3 * PASSES)
    assert fetched[PASSES:] == [0] * (2 * PASSES) and sum(fetched) <= 4 * len(new), fetched
    assert {p.name for p in cache.dir.iterdir()} >= {s.name for s in new}
