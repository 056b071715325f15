"""A store on object storage read through the node-local shard cache (on a local moto_server): the first batch
from a cold shard cache against a warm local store, and the bytes one sidecar fetches per epoch over the store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pyarrow.fs as pafs

from bench import startup
from bench.common import Metric, Server, Work
from bench.s3 import aws_environment, make_bucket, moto_server
from sigil_feed.client.stream import BatchStream, EpochEnd
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from sigil_feed.server.store.fs import resolve

RANKS, WORLD = (0, 1), 4  # the sidecar of one pod of two in a job of four ranks


def _upload(local_root: Path, location: str) -> None:
    """Copy every committed store under local_root to the location (the same fingerprints: no rebuild)."""
    target = resolve(location)
    for manifest in local_root.glob("*/manifest.json"):
        pafs.copy_files(str(manifest.parent), f"{target.root}/{manifest.parent.name}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.fs)


def _epoch_fetch(config: Path, log: Path) -> feed_pb2.CacheState:
    """One sidecar reads one epoch of each of its ranks, starting with a cold shard cache; its store stats after."""
    with Server(config, log) as server:
        for rank in RANKS:
            with BatchStream(server.target, "default", batch_size=16, seq_len=4096, prefetch=4, rank=rank,
                             world_size=WORLD) as stream:
                next(item for item in stream if isinstance(item, EpochEnd))
        with grpc.insecure_channel(server.target) as channel:
            stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=60)
    return stats.datasets[0].cache


def measure(work: Work, local_cache: Path, write: Callable[[str, dict[str, Any]], Path]) -> list[Metric]:
    """Upload the local store to a moto_server bucket, then: the first batch on a warm local store and on the
    bucket with a cold shard cache; one sidecar's epoch of ranks 0-1 of 4 from the bucket. `write(name, keys)`
    writes the cached dataset's config with these dataset keys."""
    local = write("s3-baseline", {"cache_dir": str(local_cache)})
    with moto_server() as endpoint, aws_environment(endpoint):
        location = f"{make_bucket(endpoint)}/stores"
        _upload(local_cache, location)
        warm = startup.first_batch(local, work.path("logs", "shard-cache-warm.log"))
        cold = startup.first_batch(write("s3-cold", {"cache_dir": location,
                                                     "shard_cache_dir": str(work.path("shards-cold"))}),
                                   work.path("logs", "shard-cache-cold.log"))
        epoch = _epoch_fetch(write("s3-epoch", {"cache_dir": location,
                                                "shard_cache_dir": str(work.path("shards-epoch"))}),
                             work.path("logs", "shard-cache-epoch.log"))
    first = Metric("cold_shard_cache_first_batch_s", cold["first_batch_s"], warm["first_batch_s"], "s", "",
                   mode=cold["mode"],
                   notes=("process start to the first 16x4096 batch: the store on a local moto_server (about 85 ms "
                          "per request) with an empty shard cache, against the same store in a local folder; the "
                          "difference is opening the remote store (its manifest and samples tables) and fetching "
                          "the shards the first batch reads"), details={"cold": cold, "warm": warm})
    fetched = Metric("bytes_fetched_per_sidecar_over_store", epoch.bytes_fetched, epoch.bytes, "bytes", "",
                     mode="cached",
                     notes=(f"one sidecar serving ranks {RANKS} of {WORLD} for one epoch, cold shard cache of "
                            f"{epoch.shard_cache.max_bytes / 1e9:.0f} GB: {epoch.shards} shards, "
                            f"{epoch.shard_cache.fetches} fetches; the epoch order is a permutation of the whole "
                            f"store, so a sidecar fetches every shard (a shard-aware order brings this down to "
                            f"about its share, {len(RANKS) / WORLD:.2f})"),
                     details={"fetches": epoch.shard_cache.fetches, "hit_rate": epoch.shard_cache.hit_rate,
                              "shards": epoch.shards})
    return [first, fetched]
