"""Streaming ranks of one layout share one read of the sources, and receive exactly what they receive alone."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import grpc

from sigil_feed.client.stream import BatchStream, FeedBatch
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import rust_pair, write_config, write_jsonl
from tests.integration.test_observability import sample, scrape

PAIRS, WORLD = 240, 4


def rank_hashes(stream: BatchStream, started: threading.Barrier | None = None) -> list[str]:
    """A hash of every batch of the stream's epoch (after the first batch, wait until every rank has one)."""
    hashes = []
    for item in stream:
        if isinstance(item, FeedBatch):
            hashes.append(hashlib.sha256(item.arrays["input_ids"].tobytes()).hexdigest())
            if started is not None and len(hashes) == 1:
                started.wait(60)
    return hashes


def test_concurrent_ranks_read_the_sources_once_and_get_what_they_get_one_at_a_time(tmp_path: Path,
                                                                                    start_server) -> None:
    write_jsonl(tmp_path / "pairs.jsonl", [rust_pair(i) for i in range(PAIRS)])
    config = write_config(tmp_path / "trainer.yaml", {
        "names": ["local:pairs.jsonl"], "use_cache": False, "epochs": 1, "remainder": "keep", "shuffle_seed": 3,
        "shuffle_block": 64})
    server = start_server(config, "--metrics-port", "0")

    def open_rank(rank: int) -> BatchStream:
        return BatchStream(server.target, batch_size=2, seq_len=64, rank=rank, world_size=WORLD, prefetch=2)

    together: dict[int, list[str]] = {}
    started = threading.Barrier(WORLD)

    def run(rank: int) -> None:
        with open_rank(rank) as stream:
            together[rank] = rank_hashes(stream, started)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(WORLD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(together) == list(range(WORLD)) and all(together.values())
    metrics = scrape(server)
    # 240 samples in blocks of 64: four blocks, each read once and taken by the three other ranks
    assert sample(metrics, "sigil_feed_stream_samples_read_total", dataset="default") == PAIRS
    assert sample(metrics, "sigil_feed_stream_blocks_total", dataset="default", how="read") == 4
    assert sample(metrics, "sigil_feed_stream_blocks_total", dataset="default", how="shared") == 3 * 4
    with grpc.insecure_channel(server.target) as channel:
        stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=10)
    assert stats.datasets[0].sources[0].read == PAIRS

    for rank in range(WORLD):  # one at a time: each stream the only one of its layout
        with open_rank(rank) as stream:
            assert rank_hashes(stream) == together[rank]
