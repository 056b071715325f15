"""A job of two sidecars (one per node) on one shared store, through the real servers and clients: a file that lands
in the glob after sidecar A opened epoch 1 and before sidecar B opens it is served by neither in epoch 1 (both serve
what A recorded for the run, so every sample of the epoch is served exactly once across the job), and by both from
epoch 2 on. In a local folder and in a bucket of a local S3 server (cached mode), and in streaming mode with a shared
cache folder."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from sigil_feed.client import BatchStream, EpochEnd, FeedBatch
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import rust_pair, write_config, write_jsonl

PAIRS = 12  # per file
RUN = "job-4242"
WORLD = 2  # rank 0 on sidecar A, rank 1 on sidecar B


def pairs(folder: Path, n: int) -> None:
    write_jsonl(folder / f"p{n}.jsonl", [rust_pair(i) for i in range(PAIRS * n, PAIRS * n + PAIRS)])


def sidecar_config(tmp_path: Path, node: str, cache_dir: str, *, cached: bool) -> Path:
    return write_config(tmp_path / f"{node}.yaml", {
        "names": ["local:data/*.jsonl"], "use_cache": cached, "cache_dir": cache_dir, "epochs": 3,
        "shuffle_seed": 7, "remainder": "keep", "shard_cache_dir": str(tmp_path / f"shards-{node}")},
        max_seq_len=128, pack=False)


def samples(batch: FeedBatch) -> list[str]:
    """A hash of each sample of the batch (pack: false: one per row)."""
    ids, mask = batch.arrays["input_ids"], batch.arrays["attention_mask"].astype(bool)
    return [hashlib.blake2b(np.ascontiguousarray(row[keep]).tobytes(), digest_size=12).hexdigest()
            for row, keep in zip(ids, mask, strict=True)]


def read(stream: BatchStream, served: dict[int, Counter[str]], *, batches: int | None = None,
         until_epoch: int | None = None) -> None:
    """Count the samples of `batches` batches, or up to and including the first batch of `until_epoch`, or to the
    end of the run."""
    taken = 0
    for item in stream:
        if isinstance(item, EpochEnd):
            continue
        assert isinstance(item, FeedBatch)
        served.setdefault(item.epoch, Counter()).update(samples(item))
        taken += 1
        if taken == batches or item.epoch == until_epoch:
            return


def epoch_contents(target: str) -> dict[int, str]:
    with grpc.insecure_channel(target) as channel:
        stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=30)
    return {m.epoch: m.content for m in stats.datasets[0].epoch_members}


@pytest.mark.parametrize("where", ["folder", "s3", "streaming"])
def test_sidecars_of_a_run_serve_one_membership_per_epoch_when_a_file_lands_between_their_openings(
        tmp_path: Path, start_server, request: pytest.FixtureRequest, where: str) -> None:
    data = tmp_path / "data"
    pairs(data, 0)
    pairs(data, 2)
    cache_dir = f"{request.getfixturevalue('s3_bucket')}/stores" if where == "s3" else str(tmp_path / "cache")
    cached = where != "streaming"
    sidecar_a = start_server(sidecar_config(tmp_path, "a", cache_dir, cached=cached))
    sidecar_b = start_server(sidecar_config(tmp_path, "b", cache_dir, cached=cached))
    served: list[dict[int, Counter[str]]] = [{}, {}]
    options = {"batch_size": 2, "world_size": WORLD, "prefetch": 1, "run_id": RUN, "connect_deadline_s": 120}
    with (BatchStream(sidecar_a.target, rank=0, **options) as rank_a,
          BatchStream(sidecar_b.target, rank=1, **options) as rank_b):
        read(rank_b, served[1], batches=2)  # B is early in epoch 0 (6 steps): its server has not opened epoch 1
        read(rank_a, served[0], until_epoch=1)  # A has opened epoch 1 (and recorded its files for the run)
        pairs(data, 1)  # lands now; p1 sorts between the others, so their indices move
        read(rank_b, served[1])  # B opens epoch 1 after the file landed, then epoch 2
        read(rank_a, served[0])
    job = [served[0].get(epoch, Counter()) + served[1].get(epoch, Counter()) for epoch in range(3)]
    for epoch, expected in enumerate([2 * PAIRS, 2 * PAIRS, 3 * PAIRS]):
        assert len(job[epoch]) == expected and set(job[epoch].values()) == {1}, (epoch, job[epoch].most_common(3))
    assert set(job[0]) == set(job[1]) < set(job[2])  # epoch 1 served the files A saw; epoch 2 the new one too
    assert epoch_contents(sidecar_a.target) == epoch_contents(sidecar_b.target)
    said = "".join(sidecar_b.output + sidecar_a.output)
    assert "epoch 1 serves the files the run's first sidecar to open it recorded" not in said  # B had the same
    assert "epoch 2 serves" in said


def test_a_sidecar_that_starts_after_a_file_landed_serves_epoch_0_as_the_run_began_it(
        tmp_path: Path, start_server) -> None:
    """Epoch 0 too: B starts (and builds its store of the three files) after A opened epoch 0 over two; B serves
    A's two in epoch 0, and both serve the three from epoch 1 on."""
    data = tmp_path / "data"
    pairs(data, 0)
    pairs(data, 2)
    cache_dir = str(tmp_path / "cache")
    sidecar_a = start_server(sidecar_config(tmp_path, "a", cache_dir, cached=True))
    served: list[dict[int, Counter[str]]] = [{}, {}]
    options = {"batch_size": 2, "world_size": WORLD, "prefetch": 1, "run_id": RUN, "connect_deadline_s": 120}
    with BatchStream(sidecar_a.target, rank=0, **options) as rank_a:
        read(rank_a, served[0], batches=1)
        pairs(data, 1)
        sidecar_b = start_server(sidecar_config(tmp_path, "b", cache_dir, cached=True))
        with BatchStream(sidecar_b.target, rank=1, **options) as rank_b:
            read(rank_b, served[1])
        read(rank_a, served[0])
    job = [served[0].get(epoch, Counter()) + served[1].get(epoch, Counter()) for epoch in range(3)]
    for epoch, expected in enumerate([2 * PAIRS, 3 * PAIRS, 3 * PAIRS]):
        assert len(job[epoch]) == expected and set(job[epoch].values()) == {1}, (epoch, job[epoch].most_common(3))
    said = "".join(sidecar_b.output)
    assert "epoch 0 serves the files the run's first sidecar to open it recorded ([2] files per source" in said


def test_a_run_record_names_the_run_and_an_old_client_keeps_per_sidecar_membership(
        tmp_path: Path, start_server) -> None:
    """Streams without a run id (an older client, or none in the environment) write no record; streams with one
    write one record per epoch under `runs/` in the cache folder."""
    data = tmp_path / "data"
    pairs(data, 0)
    sidecar = start_server(sidecar_config(tmp_path, "a", str(tmp_path / "cache"), cached=True))
    with BatchStream(sidecar.target, batch_size=4, prefetch=1) as stream:
        read(stream, {}, batches=1)
    assert not (tmp_path / "cache" / "runs").exists()
    with BatchStream(sidecar.target, batch_size=4, prefetch=1, run_id=RUN) as stream:
        read(stream, {})
    records = sorted(p.name for p in (tmp_path / "cache" / "runs").glob("*/*/epoch-*.json"))
    assert records == ["epoch-00000000.json", "epoch-00000001.json", "epoch-00000002.json"]
