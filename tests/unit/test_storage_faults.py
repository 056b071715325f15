"""Faults of object storage and of the cache's disk while shards are fetched: pyarrow's S3 client reaches the moto
server through a proxy that refuses, resets or stalls connections; the cache's folder sits on a tiny tmpfs."""

from __future__ import annotations

import errno
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from sigil_feed.server.errors import ConfigError, SourceError, Unavailable
from sigil_feed.server.store.format import shard_paths
from sigil_feed.server.store.fs import StoreFS, resolve
from sigil_feed.server.store.reader import open_store
from sigil_feed.server.store.retry import STORAGE_RETRY_ENV, RetryWindow
from sigil_feed.server.store.s3 import s3_filesystem
from sigil_feed.server.store.shard_cache import PART, RemoteShard, ShardCache, ShardMissing
from tests.fault_proxy import FaultProxy
from tests.unit.test_shard_cache import Remote, shard_bytes
from tests.unit.test_store import FP, make_store

SIZE = 1 << 20  # bytes per shard here, read in 128 KiB chunks (eight ranged GETs)
CHUNK = 128 << 10


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the moto server."""
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as opened:
        yield opened


@pytest.fixture
def s3(s3_bucket: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> tuple[Remote, StoreFS]:
    """Shards written to a fresh bucket directly, and the bucket as the server reaches it: through the proxy,
    with the S3 client the server builds from the standard environment. That client tries each request once
    (`AWS_MAX_ATTEMPTS`), so every fault reaches the cache's own retry window at once."""
    direct = resolve(s3_bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.endpoint}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return Remote(direct.fs, f"{direct.root}/store/shards"), resolve(s3_bucket)


def through(shard: RemoteShard, fs: StoreFS) -> RemoteShard:
    """The same shard, read through another filesystem."""
    return RemoteShard(fs.fs, shard.path, shard.size, shard.xxh3)


def open_cache(folder: Path, window_s: float, max_bytes: int = 64 * SIZE) -> ShardCache:
    """A cache whose retries start 0.1 s after a failure (the server's 0.5 s would only lengthen the tests)."""
    return ShardCache(folder, max_bytes, chunk_bytes=CHUNK, retry=RetryWindow(window_s, first_s=0.1))


@pytest.mark.parametrize(("mode", "seconds"), [("refuse", 1.5), ("reset", 1.5), ("stall", 12)])
def test_an_outage_shorter_than_the_retry_window_is_ridden_out_inside_the_fetch(
        s3: tuple[Remote, StoreFS], proxy: FaultProxy, tmp_path: Path, mode: str, seconds: float,
        caplog: pytest.LogCaptureFixture) -> None:
    """Connections refused from the start; or reset, or stalled, once a quarter of the shard has arrived: the
    fetch waits it out and goes on from where it stopped: the same bytes, each fetched once. (pyarrow's S3 client,
    trying each request once, gives up a stalled read after 9 to 10 s here, so the stall is longer.)"""
    remote, fs = s3
    shard = through(remote.put("s000-a.tokens.bin", shard_bytes(1, SIZE)), fs)
    with open_cache(tmp_path / "cache", window_s=30) as cache:
        if mode == "refuse":
            proxy.fault(mode, seconds)
        else:
            proxy.fault_after(SIZE // 4, mode, seconds)
        start = time.monotonic()
        path = cache.get(shard)
        waited = time.monotonic() - start
        assert path.read_bytes() == shard_bytes(1, SIZE)
        stats = cache.stats()
    assert waited > seconds - 1, "the fault did not meet the fetch"
    assert any("trying again" in r.getMessage() for r in caplog.records), "the cache's own retries never ran"
    assert (stats.fetches, stats.bytes_fetched, stats.checksum_failures) == (1, SIZE, 0)


def test_an_outage_longer_than_the_window_is_unavailable_naming_the_shard(
        s3: tuple[Remote, StoreFS], proxy: FaultProxy, tmp_path: Path) -> None:
    remote, fs = s3
    shard = through(remote.put("s001-b.tokens.bin", shard_bytes(2, SIZE)), fs)
    with open_cache(tmp_path / "cache", window_s=2) as cache:
        proxy.set("refuse")
        start = time.monotonic()
        with pytest.raises(Unavailable) as err:
            cache.get(shard)
        assert time.monotonic() - start < 10
        assert f"cannot fetch shard {shard.describe()}: OSError: " in str(err.value)
        assert "NETWORK_CONNECTION" in str(err.value) and "no progress for" in str(err.value)
        assert not list(cache.dir.glob(f"*{PART}*"))
        proxy.set("pass")  # storage is back: the next read fetches it
        assert cache.get(shard).read_bytes() == shard_bytes(2, SIZE)


def test_a_stopping_server_gives_up_waiting_for_storage_at_once(
        s3: tuple[Remote, StoreFS], proxy: FaultProxy, tmp_path: Path) -> None:
    remote, fs = s3
    shard = through(remote.put("s002-c.tokens.bin", shard_bytes(3, SIZE)), fs)
    with open_cache(tmp_path / "cache", window_s=60) as cache:
        proxy.set("refuse")
        future = cache.prefetch([shard])[0]
        time.sleep(1.5)
        start = time.monotonic()
        cache.stop_prefetch()
        future.result(timeout=10)  # a prefetch logs its errors
        assert time.monotonic() - start < 5


def test_a_deleted_shard_object_is_data_loss_naming_it_and_the_fix(
        s3: tuple[Remote, StoreFS], tmp_path: Path) -> None:
    remote, fs = s3
    shard = through(remote.put("s003-d.tokens.bin", shard_bytes(4, SIZE)), fs)
    remote.fs.delete_file(shard.path)
    with open_cache(tmp_path / "cache", window_s=20) as cache, pytest.raises(ShardMissing) as err:
        cache.get(shard)
    assert isinstance(err.value, SourceError)
    assert f"shard {shard.describe()} is missing from the store" in str(err.value)
    assert "rebuild the store" in str(err.value)


def test_the_samples_tables_read_at_open_ride_out_an_outage(
        s3_bucket: str, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct = resolve(f"{s3_bucket}/stores")
    make_store(f"{s3_bucket}/stores")  # type: ignore[arg-type]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.endpoint}")
    monkeypatch.setenv(STORAGE_RETRY_ENV, "20")
    fs = resolve(f"{s3_bucket}/stores")
    proxy.fault_on_request(rb"GET [^ ]+\.samples\.parquet", "reset", 1.5)
    start = time.monotonic()
    with ShardCache(tmp_path / "cache", 1 << 20) as cache:
        store = open_store(fs, f"{fs.root}/{FP}", FP, shard_cache=cache)
        assert time.monotonic() - start > 1, "the fault did not meet the read"
        assert len(store) == 3 and store.lengths.tolist() == [3, 3, 3]
        with store.shards.pinned([0, 1]) as tokens:
            assert tokens[1].tolist() == [2, 3, 4]
    assert direct.exists(f"{direct.root}/{FP}/manifest.json")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (skipped where mounting is not permitted)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs for a full disk (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_evicts_unpinned_shards_whatever_the_budget_and_the_fetch_succeeds(
        tiny_disk: Path, tmp_path: Path) -> None:
    """Three 600 kB shards fill most of a 2 MiB disk (far under the cache's 1 GB budget): the fourth runs out of
    room while it is written, the least recently used shard goes and the fetch starts again (a prefetch gives up
    instead). With every shard pinned there is nothing to evict: Unavailable names the folder and the setting."""
    (tmp_path / "remote").mkdir()
    remote = Remote(pafs.LocalFileSystem(), str(tmp_path / "remote"))
    size = 600_000
    shards = [remote.put(f"s00{i}-e.tokens.bin", shard_bytes(i, size)) for i in range(5)]
    with ShardCache(tiny_disk / "cache", 10**9, chunk_bytes=CHUNK, retry=RetryWindow(5)) as cache:
        for shard in shards[:3]:
            cache.get(shard)
        wait(cache.prefetch([shards[3]]))  # a prefetch evicts nothing for room: it gives up
        assert (cache.stats().evictions, cache.stats().shards) == (0, 3)
        assert not list(cache.dir.glob(f"*{PART}*"))
        path = cache.get(shards[3])
        assert path.read_bytes() == shard_bytes(3, size)
        stats = cache.stats()
        assert (stats.evictions, stats.shards, stats.current_bytes) == (1, 3, 3 * size)
        assert sorted(p.name for p in cache.dir.iterdir() if p.name != ".lock") == sorted(
            s.name for s in shards[1:4])

        for shard in shards[1:4]:
            cache.pin(shard)
        with pytest.raises(Unavailable) as err:
            cache.get(shards[4])
        message = str(err.value)
        assert f"shard cache {cache.dir}" in message and "dataset.shard_cache_gb" in message
        assert shards[4].describe() in message and "No space left on device" in message
        assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
        assert not list(cache.dir.glob(f"*{PART}*"))
        cache.unpin(shards[1])
        assert cache.get(shards[4]).read_bytes() == shard_bytes(4, size)


def test_a_local_store_shard_deleted_while_serving_is_data_loss_naming_it(tmp_path: Path) -> None:
    fs, path = make_store(tmp_path / "store")
    store = open_store(fs, path, FP)
    tokens_file = shard_paths(path, store.manifest.shards[1].name)[0]
    Path(tokens_file).unlink()
    with pytest.raises(ShardMissing, match="rebuild the store") as err, store.shards.pinned([1]):
        pass
    assert f"shard {tokens_file} is missing from the store" in str(err.value)


@pytest.mark.parametrize("value", ["three", "0", "-1"])
def test_an_aws_max_attempts_that_is_not_a_count_of_tries_is_a_config_error(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", value)
    with pytest.raises(ConfigError, match=rf"AWS_MAX_ATTEMPTS: '{value}' is not a whole number of tries .*fix"):
        s3_filesystem()
