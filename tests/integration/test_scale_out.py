"""Past one machine, on loopback: a store on a real S3-compatible server (moto_server), sidecars that elect one
builder through the store's lease, and shards read through bounded node-local shard caches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow.fs as pafs
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.s3 import S3_ENV, make_bucket
from sigil_feed.client import FeedDataset
from sigil_feed.client.stream import BatchStream
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from sigil_feed.server.cached.working_set import cache_gb_to_fit
from sigil_feed.server.store.format import read_manifest
from sigil_feed.server.store.fs import StoreFS, resolve
from sigil_feed.server.store.reader import open_store
from tests.conftest import ServerProcess, batch_digest, write_config, write_jsonl
from tests.integration.conftest import metrics_url, open_request, stream_status
from tests.integration.test_cache import CLI, wait_for

FILES = 6  # one shard each
Rows = Counter[tuple[int, ...]]


def write_corpus(folder: Path, records: int, repeat: int) -> None:
    """`records` distinct code records over FILES files (so FILES shards of about the same size)."""
    for f in range(FILES):
        write_jsonl(folder / "corpus" / f"part{f}.jsonl",
                    [{"text": f"fn f{i}() {{ {'let x = 1; ' * (repeat + i % 7)} }}"} for i in range(f, records, FILES)])


def config(folder: Path, name: str, cache_dir: str, **dataset: Any) -> Path:
    """A cached dataset of the corpus, shuffled, one whole sample per row (pack: false), one epoch; 2 virtual
    ranks, which 4 ranks do not divide, so every sidecar reads every shard (a cache smaller than that thrashes)."""
    section = {"names": ["local:corpus"], "use_cache": True, "cache_dir": cache_dir, "tokenizer_backend": "hf",
               "shuffle_seed": 3, "remainder": "keep", "epochs": 1, "min_length": 16, "virtual_ranks": 2,
               **dataset}
    return write_config(folder / f"{name}.yaml", section, max_seq_len=512, pack=False)


def cache_build(config_file: Path) -> None:
    subprocess.run([*CLI, "cache", "build", "--config", str(config_file)], capture_output=True, text=True,
                   timeout=300, check=True, cwd=config_file.parent)


def rank_epoch(target: str, rank: int, world_size: int) -> tuple[list[str], Rows]:
    """One rank's epoch: a hash of every batch, and its rows (whole samples) as a multiset."""
    digests, rows = [], Counter[tuple[int, ...]]()
    for batch in FeedDataset(target, batch_size=8, rank=rank, world_size=world_size):
        digests.append(batch_digest(batch))
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            rows[tuple(ids[mask.bool()].tolist())] += 1
    return digests, rows


def dataset_stats(target: str) -> feed_pb2.DatasetStats:
    with grpc.insecure_channel(target) as channel:
        return feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=30).datasets[0]


def data_feed_health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="sigil_feed.v1.DataFeed"), timeout=10).status


def the_store(location: str) -> tuple[StoreFS, str]:
    """The one store folder under a location."""
    fs = resolve(location)
    (folder,) = [i.path for i in fs.listdir(fs.root) if i.type == pafs.FileType.Directory]
    return fs, folder


@pytest.fixture(scope="module")
def s3_store(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A store built by `cache build` into a fresh bucket (the AWS environment set for the whole module), and the
    same corpus's store built by a server into a local folder (ranks 0-3 of it read once)."""
    folder = tmp_path_factory.mktemp("scale")
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, **S3_ENV}.items():
            env.setenv(key, value)
        bucket = make_bucket(s3_endpoint).removeprefix("s3://")
        write_corpus(folder, records=360, repeat=12)
        location = f"s3://{bucket}/stores"
        cache_build(config(folder, "build", location))
        fs, store = the_store(location)
        local = ServerProcess(config(folder, "local", str(folder / "local-store")))
        try:
            reference = [rank_epoch(local.target, rank, 4) for rank in range(4)]
        finally:
            local.stop(signal.SIGKILL)
        yield {"folder": folder, "location": location, "fs": fs, "store": store, "reference": reference,
               "manifest": read_manifest(fs, store), "bucket": bucket}


def test_two_sidecars_with_their_own_shard_caches_serve_four_ranks_as_a_local_store_does(
        s3_store: dict[str, Any], start_server) -> None:
    """Sidecar A serves ranks 0-1 with room for every shard; sidecar B ranks 2-3 with room for 2 shards of 6, so
    it evicts and fetches shards again: every batch equals the local store's, every sample once per epoch."""
    folder, manifest = s3_store["folder"], s3_store["manifest"]
    sizes = [s.tokens_file.size for s in manifest.shards]
    assert len(sizes) == FILES and max(sizes) < 1.2 * min(sizes)
    two_shards_gb = 2.5 * sum(sizes) / len(sizes) / 1e9
    sidecars = [start_server(config(folder, name, s3_store["location"], shard_cache_dir=str(folder / name),
                                    **extra), "--metrics-port", "0")
                for name, extra in (("a", {}), ("b", {"shard_cache_gb": two_shards_gb}))]
    served = [rank_epoch(sidecars[rank // 2].target, rank, 4) for rank in range(4)]
    assert [digests for digests, _ in served] == [digests for digests, _ in s3_store["reference"]]
    everything = sum((rows for _, rows in served), Counter())
    assert sum(everything.values()) == manifest.samples and set(everything.values()) == {1}
    assert not any("tokenizing" in line for s in sidecars for line in s.output)  # nobody built

    a, b = (dataset_stats(s.target).cache for s in sidecars)
    for cache in (a, b):
        assert cache.state == "ready" and cache.bytes == manifest.bytes and cache.shards == FILES
    assert a.shard_cache.evictions == 0 and a.shard_cache.fetches == FILES and a.shard_cache.bytes == sum(sizes)
    samples_bytes = sum(s.samples_file.size for s in manifest.shards)
    index = manifest.samples_index.file.size  # opening reads the samples index, not every shard's samples table
    assert manifest.bytes == sum(sizes) + samples_bytes + index and a.bytes_fetched == sum(sizes) + index
    assert b.shard_cache.evictions > 0 and b.shard_cache.fetches > FILES  # evicted shards fetched again
    assert b.shard_cache.bytes <= b.shard_cache.max_bytes and b.shard_cache.checksum_failures == 0
    assert b.bytes_fetched > manifest.bytes and 0 < b.shard_cache.hit_rate < 1
    printed = subprocess.run([*CLI, "stats", "--target", sidecars[1].target], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    assert f"{manifest.bytes:,} bytes" in printed and "shard cache" in printed and "hit rate" in printed
    with urllib.request.urlopen(metrics_url(sidecars[1]), timeout=10) as response:
        metrics = response.read().decode()
    assert f'sigil_feed_store_bytes{{dataset="default"}} {float(manifest.bytes)}' in metrics
    assert f'sigil_feed_shard_cache_evictions_total{{dataset="default"}} {float(b.shard_cache.evictions)}' in metrics


def test_a_sidecar_whose_ranks_read_more_at_once_than_its_shard_cache_holds_says_so(
        s3_store: dict[str, Any], start_server) -> None:
    """Ranks 0-1 of 4 (V = 2: they read every shard) open an epoch on a sidecar whose shard cache holds about one
    shard: one warning names the ranks, what they need and the budget; GetStats and /metrics show the working set.
    A sidecar with room says nothing."""
    folder, manifest = s3_store["folder"], s3_store["manifest"]
    sizes = [s.tokens_file.size for s in manifest.shards]
    budget_gb = 1.2 * max(sizes) / 1e9
    tight, roomy = (start_server(config(folder, name, s3_store["location"], shard_cache_dir=str(folder / name),
                                        **extra), "--metrics-port", "0")
                    for name, extra in (("tight", {"shard_cache_gb": budget_gb}), ("roomy", {})))
    needs = {}
    for server in (tight, roomy):
        with (BatchStream(server.target, batch_size=8, seq_len=512, rank=0, world_size=4) as first,
              BatchStream(server.target, batch_size=8, seq_len=512, rank=1, world_size=4) as second):
            next(first), next(second)
            cache = dataset_stats(server.target).cache
        working = needs[server] = cache.working_set
        assert (working.epoch, working.world_size, list(working.ranks)) == (0, 4, [0, 1])
        assert working.virtual_ranks == 2 and working.shards == FILES and working.epoch_bytes == sum(sizes)
        assert max(sizes) < cache.working_set_bytes <= sum(sizes)
        assert working.fits == (server is roomy) == (cache.working_set_bytes <= cache.shard_cache.max_bytes)
        printed = subprocess.run([*CLI, "stats", "--target", server.target], capture_output=True, text=True,
                                 check=True, timeout=60).stdout
        assert (f"working set of ranks 0-1 of 4 (epoch 0, 2 virtual ranks): {cache.working_set_bytes:,} bytes at "
                f"once, {'fits' if server is roomy else 'does NOT fit the shard cache'}") in " ".join(printed.split())
        assert f"shard_cache_gb that fits it: {cache_gb_to_fit(cache.working_set_bytes):g};" in printed
        with urllib.request.urlopen(metrics_url(server), timeout=10) as response:
            metrics = response.read().decode()
        assert (f'sigil_feed_shard_cache_working_set_bytes{{dataset="default"}} {float(cache.working_set_bytes)}'
                in metrics)
    wait_for(lambda: any("ranks 0-1 of 4 read up to" in line for line in tight.output), timeout=30)
    time.sleep(1)
    warnings = [line for line in tight.output if "read up to" in line]
    warning = warnings[-1]  # once the ranks have opened (rank 0 alone only if rank 1 came seconds later)
    assert len(warnings) == 1 or (len(warnings) == 2 and "ranks 0 of 4" in warnings[0]), warnings
    assert "WARNING" in warning and "epoch 0: ranks 0-1 of 4 read up to" in warning
    assert f"(dataset.shard_cache_gb: {budget_gb:g})" in warning and "set dataset.shard_cache_gb to at least" in warning
    assert not any("read up to" in line for line in roomy.output)


def test_a_shard_corrupted_on_object_storage_ends_the_stream_with_data_loss_naming_it(
        s3_store: dict[str, Any], start_server) -> None:
    """A copy of the store whose first shard object is overwritten after the commit: a fresh sidecar fetches it,
    finds it bad twice and ends the stream with DATA_LOSS naming it."""
    fs, store, folder = s3_store["fs"], s3_store["store"], s3_store["folder"]
    copy = f"{s3_store['bucket']}/copy/{store.rsplit('/', 1)[1]}"
    for info in fs.fs.get_file_info(pafs.FileSelector(store, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.fs.copy_file(info.path, copy + info.path[len(store):])
    shard = s3_store["manifest"].shards[0]
    tokens_path = f"{copy}/shards/{shard.name}.tokens.bin"
    fs.write_bytes(tokens_path, bytes(reversed(fs.read_bytes(tokens_path))))  # same size, other bytes
    server = start_server(config(folder, "damaged", f"s3://{s3_store['bucket']}/copy",
                                 shard_cache_dir=str(folder / "damaged-cache")))
    with grpc.insecure_channel(server.target) as channel:
        code, details, _ = stream_status(feed_pb2_grpc.DataFeedStub(channel),
                                         [open_request(batch_size=32, credits=64)], timeout=120)
    assert code == grpc.StatusCode.DATA_LOSS, (code, details)
    assert f"shard s3://{tokens_path} failed its checksum on two fetches" in details
    assert dataset_stats(server.target).cache.shard_cache.checksum_failures == 2


def test_sidecars_elect_one_builder_and_one_takes_over_when_it_is_killed(tmp_path: Path, s3_bucket: str,
                                                                        start_server) -> None:
    """Two sidecars start on an empty store location: one builds, the other waits (saying for whom, DataFeed
    NOT_SERVING). The builder is SIGKILLed mid-build: the other takes the lease over, keeps the finished shards,
    and builds the rest; there is never a manifest before the whole store is written."""
    write_corpus(tmp_path, records=3000, repeat=300)
    location = f"{s3_bucket}/stores"
    shards = FILES * 10  # each file in 10 parts: so many shards that the kill always lands mid-build
    sidecars = [start_server(config(tmp_path, name, location, shard_cache_dir=str(tmp_path / name),
                                    shard_records=3000 // shards)) for name in ("a", "b")]

    def states() -> list[feed_pb2.CacheState]:
        return [dataset_stats(s.target).cache for s in sidecars]

    wait_for(lambda: sorted(c.state for c in states()) == ["building", "waiting"])
    building = next(i for i, c in enumerate(states()) if c.state == "building")
    builder, waiter = sidecars[building], sidecars[1 - building]
    waiting = dataset_stats(waiter.target).cache
    assert waiting.error.startswith(f"waiting for build by {os.uname().nodename}/{builder.proc.pid} (heartbeat")
    assert data_feed_health(waiter.target) == health_pb2.HealthCheckResponse.NOT_SERVING

    fs = resolve(location)

    def finished_shards() -> list[str]:
        return [i.path for i in fs.fs.get_file_info(pafs.FileSelector(fs.root, recursive=True))
                if i.path.endswith(".json") and "/shards/" in i.path]

    wait_for(lambda: finished_shards())
    builder.stop(signal.SIGKILL)
    done = len(finished_shards())
    assert 1 <= done < shards and not [p for p in finished_shards() if p.endswith("manifest.json")]
    _, store = the_store(location)
    assert not fs.exists(f"{store}/manifest.json")  # no commit: nobody can serve it

    wait_for(lambda: dataset_stats(waiter.target).cache.state == "ready")
    log = "".join(waiter.output)
    assert "took over the build lease" in log and f"{shards - done} written, {done} complete from before" in log
    manifest = read_manifest(fs, store)
    assert open_store(fs, store, manifest.fingerprint).manifest == manifest  # complete and valid
    _, rows = rank_epoch(waiter.target, 0, 1)
    assert sum(rows.values()) == manifest.samples == 3000 and set(rows.values()) == {1}
    assert data_feed_health(waiter.target) == health_pb2.HealthCheckResponse.SERVING
    assert json.loads(fs.read_bytes(f"{store}/manifest.json"))["built_by"].endswith(f"/{waiter.proc.pid}")
