"""The node-local shard cache against real filesystems: a local folder and a moto S3 server as the remote store."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import xxhash
from fsspec.implementations.local import LocalFileSystem

from sigil_feed.server.config import load_config
from sigil_feed.server.errors import ConfigError, SourceError
from sigil_feed.server.store.shard_cache import PART, RemoteShard, ShardCache, ShardDamaged, first_free_slot

SIZE = 5000  # bytes per test shard; the cache reads them in 1000-byte chunks


class Remote:
    """A folder of shard files on a pyarrow filesystem, written as plain data."""

    def __init__(self, fs: pafs.FileSystem, base: str) -> None:
        self.fs, self.base = fs, base

    def put(self, name: str, data: bytes, *, claimed: bytes | None = None) -> RemoteShard:
        """Write a shard; the returned facts describe `claimed` (default: the data itself)."""
        path = f"{self.base}/{name}"
        with self.fs.open_output_stream(path) as out:
            out.write(data)
        facts = data if claimed is None else claimed
        return RemoteShard(self.fs, path, len(facts), xxhash.xxh3_64_hexdigest(facts))


def shard_bytes(seed: int, size: int = SIZE) -> bytes:
    """Distinct, deterministic shard content."""
    return bytes((seed * 131 + i * 7) % 251 for i in range(size))


@pytest.fixture
def local_remote(tmp_path: Path) -> Remote:
    (tmp_path / "remote").mkdir()
    return Remote(pafs.LocalFileSystem(), str(tmp_path / "remote"))


@pytest.fixture(params=["local", "s3"])
def remote(request: pytest.FixtureRequest, local_remote: Remote) -> Remote:
    """The remote store: a local folder, or a fresh bucket on the moto server through pyarrow's S3 client."""
    if request.param == "local":
        return local_remote
    bucket = request.getfixturevalue("s3_bucket").removeprefix("s3://")
    fs = pafs.S3FileSystem(endpoint_override=request.getfixturevalue("s3_endpoint").split("://")[1], scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    return Remote(fs, f"{bucket}/store/fp0/shards")


@pytest.fixture
def open_cache(tmp_path: Path) -> Iterator[Callable[..., ShardCache]]:
    """Open shard caches on tmp_path/cache (one at a time); all are closed at the end."""
    opened: list[ShardCache] = []

    def open_(shards: int = 2, **kwargs: Any) -> ShardCache:
        kwargs.setdefault("chunk_bytes", 1000)
        cache = ShardCache(tmp_path / "cache", shards * SIZE, **kwargs)
        opened.append(cache)
        return cache

    yield open_
    for cache in opened:
        cache.close()


def cached_names(cache: ShardCache) -> set[str]:
    return {p.name for p in cache.dir.iterdir() if p.name != ".lock"}


def test_get_fetches_verifies_and_then_hits(remote: Remote, open_cache: Callable[..., ShardCache]) -> None:
    shard = remote.put("s000-a.tokens.bin", shard_bytes(1))
    cache = open_cache()
    path = cache.get(shard)
    assert path.read_bytes() == shard_bytes(1) and path.name == f"{shard.xxh3}-s000-a.tokens.bin"
    assert cache.get(shard) == path
    stats = cache.stats()
    assert (stats.fetches, stats.bytes_fetched, stats.misses, stats.hits) == (1, SIZE, 1, 1)
    assert (stats.shards, stats.current_bytes, stats.hit_rate) == (1, SIZE, 0.5)


def test_a_bad_shard_is_fetched_once_more_then_named(remote: Remote, open_cache: Callable[..., ShardCache]) -> None:
    good = shard_bytes(2)
    shard = remote.put("s001-b.tokens.bin", good[:-1] + b"\x00", claimed=good)  # one byte differs
    cache = open_cache()
    with pytest.raises(ShardDamaged, match=r"shard .*s001-b\.tokens\.bin failed its checksum on two fetches") as err:
        cache.get(shard)
    assert isinstance(err.value, SourceError)
    assert shard.describe() in str(err.value)
    stats = cache.stats()
    assert (stats.fetches, stats.checksum_failures, stats.bytes_fetched, stats.shards) == (2, 2, 2 * SIZE, 0)
    assert cached_names(cache) == set()  # neither the bad copy nor a partial file stays


def test_a_longer_remote_file_is_damage(local_remote: Remote, open_cache: Callable[..., ShardCache]) -> None:
    good = shard_bytes(3)
    shard = local_remote.put("s002-c.tokens.bin", good + b"extra", claimed=good)
    with pytest.raises(ShardDamaged, match=rf"got {SIZE + 1}\+ bytes"):
        open_cache().get(shard)


class CorruptFirstRead(LocalFileSystem):
    """A local filesystem whose first read of each file returns one flipped byte (a transfer gone bad once)."""

    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.opened: set[str] = set()

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode and path not in self.opened:
            self.opened.add(path)
            data = bytearray(Path(path).read_bytes())
            data[len(data) // 2] ^= 0xFF
            return io.BytesIO(bytes(data))
        return super()._open(path, mode, **kwargs)


def test_a_shard_bad_once_is_refetched(tmp_path: Path, open_cache: Callable[..., ShardCache]) -> None:
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(CorruptFirstRead()))
    remote = Remote(fs, str(tmp_path / "remote"))
    (tmp_path / "remote").mkdir()
    shard = remote.put("s003-d.tokens.bin", shard_bytes(4))
    cache = open_cache()
    assert cache.get(shard).read_bytes() == shard_bytes(4)
    stats = cache.stats()
    assert (stats.fetches, stats.checksum_failures, stats.shards) == (2, 1, 1)


def test_least_recently_used_is_evicted_at_two_shards(local_remote: Remote,
                                                      open_cache: Callable[..., ShardCache]) -> None:
    a, b, c = (local_remote.put(f"s{i}.bin", shard_bytes(i)) for i in range(3))
    cache = open_cache(shards=2)
    cache.get(a)
    cache.get(b)
    cache.get(a)  # b is now the least recently used
    cache.get(c)
    assert cached_names(cache) == {a.name, c.name}
    cache.get(b)  # refetched; a goes now
    assert cached_names(cache) == {b.name, c.name}
    stats = cache.stats()
    assert (stats.evictions, stats.fetches, stats.current_bytes) == (2, 4, 2 * SIZE)
    assert cache.get(b).read_bytes() == shard_bytes(1)


def test_pinned_shards_are_never_evicted(local_remote: Remote, open_cache: Callable[..., ShardCache]) -> None:
    a, b, c, d = (local_remote.put(f"s{i}.bin", shard_bytes(i)) for i in range(4))
    cache = open_cache(shards=2)
    with cache.pinned(a) as path:
        cache.get(b)
        cache.get(c)  # a is the least recently used, but pinned: b goes
        assert cached_names(cache) == {a.name, c.name}
        cache.get(d)
        assert cached_names(cache) == {a.name, d.name} and path.exists()
    cache.pin(a)
    cache.pin(d)
    cache.get(b)  # both in use: over budget rather than fail
    assert cache.stats().current_bytes == 3 * SIZE
    cache.unpin(d)  # back within budget: the least recently used unpinned shard goes
    assert cached_names(cache) == {a.name, b.name} and cache.stats().current_bytes == 2 * SIZE
    cache.unpin(a)
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin(a)


def test_prefetch_fetches_in_the_background(remote: Remote, open_cache: Callable[..., ShardCache]) -> None:
    a, b = remote.put("s0.bin", shard_bytes(0)), remote.put("s1.bin", shard_bytes(1))
    cache = open_cache(shards=2)
    futures = cache.prefetch([a, b, a])
    wait(futures)
    assert len(futures) == 2 and all(f.exception() is None for f in futures)
    assert cache.prefetch([a, b]) == []  # cached already
    cache.get(a)
    cache.get(b)
    stats = cache.stats()
    assert (stats.fetches, stats.hits, stats.misses) == (2, 2, 0)


def test_a_stopped_prefetch_drops_its_queue_and_takes_no_more(local_remote: Remote,
                                                              open_cache: Callable[..., ShardCache]) -> None:
    """At server stop the queued prefetches are cancelled (the process's exit would otherwise wait for them all)
    and later ones are not taken; reading a shard still works."""
    shards = [local_remote.put(f"s{i}.bin", shard_bytes(i)) for i in range(40)]
    cache = open_cache(shards=40, workers=1)
    with cache.pinned(shards[0]):
        queued = cache.prefetch(shards[1:])
        cache.stop_prefetch()
    assert any(f.cancelled() for f in queued)
    wait([f for f in queued if not f.cancelled()])  # (a future cancelled by shutdown never counts as done for wait)
    assert cache.prefetch(shards) == []
    assert cache.get(shards[39]).read_bytes() == shard_bytes(39)


def test_prefetch_never_pushes_out_shards_in_use(local_remote: Remote, open_cache: Callable[..., ShardCache]) -> None:
    a, b, c = (local_remote.put(f"s{i}.bin", shard_bytes(i)) for i in range(3))
    cache = open_cache(shards=2)
    cache.pin(a)
    cache.pin(b)
    wait(cache.prefetch([c]))
    assert cached_names(cache) == {a.name, b.name} and cache.stats().fetches == 2


def test_restart_reuses_verified_files_and_drops_partials(local_remote: Remote,
                                                          open_cache: Callable[..., ShardCache]) -> None:
    a, b = local_remote.put("s0.bin", shard_bytes(0)), local_remote.put("s1.bin", shard_bytes(1))
    first = open_cache()
    first.get(a)
    first.get(b)
    first.close()
    (first.dir / f".{a.name}{PART}dead").write_bytes(b"half a download")
    damaged = bytearray((first.dir / b.name).read_bytes())
    damaged[7] ^= 1
    (first.dir / b.name).write_bytes(bytes(damaged))

    cache = open_cache()
    assert cached_names(cache) == {a.name, b.name}
    assert cache.stats().current_bytes == 2 * SIZE
    assert cache.get(a).read_bytes() == shard_bytes(0)
    assert cache.stats().fetches == 0  # verified, not fetched
    assert cache.get(b).read_bytes() == shard_bytes(1)  # the damaged copy is fetched again
    assert cache.stats().fetches == 1


def test_restart_with_a_smaller_budget_evicts_the_oldest(local_remote: Remote,
                                                         open_cache: Callable[..., ShardCache]) -> None:
    a, b = local_remote.put("s0.bin", shard_bytes(0)), local_remote.put("s1.bin", shard_bytes(1))
    first = open_cache()
    first.get(b)
    time.sleep(0.01)
    first.get(a)  # a is the most recently used (its mtime says so)
    first.close()
    assert cached_names(open_cache(shards=1)) == {a.name}


class GatedOpen(LocalFileSystem):
    """A local filesystem whose reads wait until the gate opens (a slow network)."""

    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.opens = threading.Event(), 0

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            self.opens += 1
            assert self.gate.wait(60)
        return super()._open(path, mode, **kwargs)


def test_concurrent_gets_of_one_shard_download_it_once(tmp_path: Path,
                                                       open_cache: Callable[..., ShardCache]) -> None:
    slow = GatedOpen()
    (tmp_path / "remote").mkdir()
    slow.gate.set()
    shard = Remote(pafs.PyFileSystem(pafs.FSSpecHandler(slow)), str(tmp_path / "remote")).put("s0.bin",
                                                                                               shard_bytes(0))
    slow.gate.clear()
    cache = open_cache()
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(cache.get(shard))) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while cache.stats().misses < 4:  # all four are waiting on the one download
        assert time.monotonic() < deadline
        time.sleep(0.01)
    slow.gate.set()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and paths[0].read_bytes() == shard_bytes(0)
    assert (slow.opens, cache.stats().fetches, cache.stats().bytes_fetched) == (1, 1, SIZE)


def test_one_process_per_cache_folder(open_cache: Callable[..., ShardCache]) -> None:
    first = open_cache()
    with pytest.raises(ConfigError, match=r"dataset.shard_cache_dir: .* in use by another process"):
        open_cache()
    first.close()
    open_cache()  # free again


def test_shard_facts_are_checked() -> None:
    with pytest.raises(ValueError, match="16 lowercase hex digits"):
        RemoteShard(pafs.LocalFileSystem(), "/x/s0.bin", 10, "XYZ")


def test_shard_cache_config_keys(tmp_path: Path) -> None:
    write = (tmp_path / "trainer.yaml").write_text
    write("model_name: t\ndataset:\n  names: [local:x]\n")
    section = load_config(tmp_path / "trainer.yaml").datasets["default"].dataset
    assert (section.shard_cache_dir, section.shard_cache_gb) == (None, 20.0)
    write("model_name: t\ndataset:\n  names: [local:x]\n  shard_cache_dir: /nvme/shards\n  shard_cache_gb: 0\n")
    with pytest.raises(ConfigError, match=r"dataset\.shard_cache_gb"):
        load_config(tmp_path / "trainer.yaml")


def test_default_location_gives_each_live_server_its_own_slot_and_a_restart_its_old_one(tmp_path: Path) -> None:
    """Two caches at the default location in one host take slots 0 and 1; once 0 is free it is taken again."""
    first = first_free_slot(tmp_path / "shards", 1 << 20)
    second = first_free_slot(tmp_path / "shards", 1 << 20)
    assert (first.dir.name, second.dir.name) == ("0", "1")
    first.close()
    again = first_free_slot(tmp_path / "shards", 1 << 20)
    assert again.dir.name == "0"
    again.close()
    second.close()
