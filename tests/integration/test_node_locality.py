"""A job of 4 sidecars x 4 ranks, numbered as torchrun numbers them (node k: ranks 4k .. 4k + 3), reading one
store on a local S3 server through the real server and client: every sample exactly once across the job in an
epoch, and each sidecar fetching about its node's share of the store (the node-aware deal), not its ranks'
scattered runs."""

from __future__ import annotations

import hashlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sigil_feed.client import FeedDataset
from sigil_feed.server.store.format import read_manifest
from tests.conftest import ServerProcess, write_jsonl
from tests.integration.test_scale_out import cache_build, config, dataset_stats, the_store

NODES, LOCAL = 4, 4
WORLD = NODES * LOCAL
SHARDS, PER_SHARD = 18, 64  # 1,152 samples: `auto` takes 16 virtual ranks, so a rank's run is 1.125 shards
SHARE_BOUND = 1.5


def rank_epoch(target: str, rank: int) -> Counter[str]:
    """One epoch of a rank through FeedDataset: a hash of every sample it served."""
    served = Counter[str]()
    for batch in FeedDataset(target, batch_size=8, rank=rank, world_size=WORLD):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            served[hashlib.blake2b(ids[mask.bool()].numpy().tobytes(), digest_size=16).hexdigest()] += 1
    return served


def test_four_sidecars_of_four_ranks_serve_each_sample_once_and_fetch_about_their_share(
        tmp_path: Path, s3_bucket: str, start_server) -> None:
    """The store (18 equal shards of distinct samples, `pack: false`) is built into the bucket; 4 sidecars, each
    with its own cold shard cache, serve one epoch of their node's 4 ranks of 16 (all 16 at once). Every sample is
    served once in the job, and each sidecar's shard fetches are within 1.5x its node's share of the store's token
    bytes (its `bytes_fetched` within that plus the samples index). The plain deal (rank r taking rows start + r,
    ...) gives each node 4 runs of 1.125 shards, 8 shards for a share of 4.5 (measured 1.76x): this fails if the
    deal stops being node-aware."""
    records = [{"text": f"fn s{i}() -> u64 {{ {'let v = 7; ' * (3 + i % 5)}{i} }}"} for i in range(SHARDS * PER_SHARD)]
    write_jsonl(tmp_path / "corpus" / "records.jsonl", records)
    location = f"{s3_bucket}/stores"
    section = {"shard_records": PER_SHARD, "virtual_ranks": "auto", "min_length": 1}
    cache_build(config(tmp_path, "build", location, **section))
    fs, store = the_store(location)
    manifest = read_manifest(fs, store)
    assert len(manifest.shards) == SHARDS and manifest.samples == SHARDS * PER_SHARD

    configs = [config(tmp_path, f"node{k}", location, shard_cache_dir=str(tmp_path / f"shards{k}"), **section)
               for k in range(NODES)]
    with ThreadPoolExecutor(WORLD) as pool:
        sidecars: list[ServerProcess] = list(pool.map(start_server, configs))
        served = list(pool.map(rank_epoch, [sidecars[rank // LOCAL].target for rank in range(WORLD)], range(WORLD)))

    everything = sum(served, Counter[str]())
    assert len(everything) == manifest.samples and set(everything.values()) == {1}

    tokens = sum(s.tokens_file.size for s in manifest.shards)
    share, index = tokens / NODES, manifest.samples_index.file.size
    for node, sidecar in enumerate(sidecars):
        cache = dataset_stats(sidecar.target).cache
        fetched = cache.shard_cache.bytes_fetched
        assert cache.shard_cache.evictions == 0 and cache.bytes_fetched == fetched + index
        assert fetched <= SHARE_BOUND * share, (node, fetched / share, cache.shard_cache.fetches)
