"""The runtime owns the process's pools and shard caches: one cache per folder, and nothing of it left running
once it is closed."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path

import pytest

from sigil_feed.server.errors import ConfigError
from sigil_feed.server.pipeline.samples import Sample
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.store.shard_cache import ShardCache
from sigil_feed.server.streaming.block_order import Block
from sigil_feed.server.streaming.encoding import encode_block
from tests.unit.streaming_fixtures import encoder, mix_at

POOLS = ("encode", "block-read", "layout", "shard-prefetch")


def test_one_shard_cache_per_folder_until_the_runtime_closes(tmp_path: Path) -> None:
    with Runtime() as runtime:
        first = runtime.shard_cache(tmp_path / "c", 1000)
        assert runtime.shard_cache(tmp_path / "c", 1000) is first
        with pytest.raises(ConfigError, match="different budgets"):
            runtime.shard_cache(tmp_path / "c", 2000)
    ShardCache(tmp_path / "c", 1000).close()  # closing the runtime gave the folder up
    with pytest.raises(RuntimeError, match="closed"):
        runtime.shard_cache(tmp_path / "c", 1000)


def test_closing_leaves_no_thread_of_the_runtime_running(tmp_path: Path) -> None:
    with Runtime() as runtime:
        runtime.shard_cache(tmp_path / "c", 1000).prefetch([])
        for pool in (runtime.encode_pool, runtime.read_pool, runtime.layout_pool):
            assert pool.submit(threading.current_thread).result().name.startswith(POOLS)
    assert not [t.name for t in threading.enumerate() if t.name.startswith(POOLS)]
    with pytest.raises(RuntimeError):
        runtime.read_pool.submit(print)
    runtime.close()  # again: nothing to do


def test_an_encoding_dropped_at_close_fails_its_chunks_instead_of_leaving_them_unresolved() -> None:
    """A rank waiting for a chunk whose encoding never ran (the pool shut down first) gets CancelledError,
    so a stopping server's last stream threads end."""
    pool = ThreadPoolExecutor(1)
    busy = threading.Event()
    pool.submit(busy.wait, 30)
    samples = [Sample(0, 0, i, text=f"fn f{i}() {{}}", kind="text") for i in range(3)]
    block = encode_block(Block(0, mix_at(0), samples, mix_at(3), True), encoder(), with_prompts=False,
                         on_encoded=lambda samples, encoded: None, pool=pool)
    pool.shutdown(wait=False, cancel_futures=True)
    busy.set()
    with pytest.raises(CancelledError):
        block.chunks[0].result(timeout=30)
