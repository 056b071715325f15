"""One statistics snapshot: /metrics renders the numbers GetStats returns at the same moment, taking one snapshot
per scrape, for a real servicer whose datasets served and whose streams are in its registry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from sigil_feed.protos import feed_pb2
from sigil_feed.server.config import Limits, parse_config
from sigil_feed.server.feed.batches import Feed
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.observe.streams import ClientStream, OpenStream
from sigil_feed.server.rpc.credits import Credits
from sigil_feed.server.rpc.metrics import FeedCollector, RpcStatuses
from sigil_feed.server.rpc.service import DataFeedService
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.streaming.packer import Packer
from tests.conftest import TOKENIZER_DIR, rust_pair
from tests.unit.streaming_fixtures import encoder

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory, runtime: Runtime) -> dict[str, ServedDataset]:
    """`default` (cached, its store built) and `stream` (streaming), each having served a few batches."""
    root = tmp_path_factory.mktemp("snapshot")
    data = root / "pairs.jsonl"
    records = [json.dumps(rust_pair(i)) for i in range(30)] + ['{"prompt": "truncated']
    data.write_text("\n".join(records) + "\n")
    raw = {"model_name": str(TOKENIZER_DIR), "max_seq_len": 32, "pack": True,
           "dataset": {"names": [f"local:{data}"], "use_cache": True, "cache_dir": str(root / "cache")},
           "server": {"datasets": {"stream": {"dataset": {"use_cache": False, "shuffle_block": 8}}}}}
    config = parse_config(raw, "test.yaml", root)
    out = {name: ServedDataset(c, "test.yaml", encoder(), runtime=runtime) for name, c in config.datasets.items()}
    for dataset in out.values():
        dataset.prepare(show_bar=False)
        feed = Feed(dataset, rank=0, world_size=1, batch_size=2, seq_len=32, start=None)
        for item in [next(feed) for _ in range(3)]:
            if item.rows is not None:
                dataset.throughput.add(item.rows.tokens)
        settle(feed)
    return out


def settle(feed: Feed) -> None:
    """Wait for a streaming feed's read-ahead of its next block, so that the counters compared stop moving."""
    if isinstance(feed.packer, Packer) and feed.packer.stream.blocks.ahead is not None:
        feed.packer.stream.blocks.ahead.exception()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """time.monotonic, frozen at clock[0] (so that the snapshots compared are taken at the same moment)."""
    now = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    yield now


def open_stream(service: DataFeedService, dataset: str, rank: int, world: int, client_id: str,
                credits: int) -> OpenStream[Credits]:
    stream = OpenStream(dataset, ClientStream(f"ipv4:127.0.0.1:{5000 + rank}", client_id, rank, world),
                        Credits(credits, limit=8))
    service.streams.add(stream)
    return stream


def report(stream: OpenStream[Credits], wait_s: float, step_s: float, steps: int = 4) -> None:
    stream.report(feed_pb2.StepTiming(steps=steps, wait_s=wait_s, step_s=step_s, wait_counts=[0, steps - 1, 0, 1]))


def scrape(collector: FeedCollector) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def rendered(stats: feed_pb2.Stats) -> Samples:
    """What /metrics must show for this snapshot: every family, sample by sample, from the GetStats fields."""
    out: Samples = {}

    def put(name: str, value: float, **labels: str) -> None:
        out[name, tuple(sorted(labels.items()))] = value

    for ds in stats.datasets:
        name = ds.name
        put("sigil_feed_batches_served_total", ds.batches_served, dataset=name)
        put("sigil_feed_tokens_served_total", ds.tokens_served, dataset=name)
        put("sigil_feed_streams_opened_total", ds.streams_opened, dataset=name)
        put("sigil_feed_streams_closed_total", ds.streams_closed, dataset=name)
        put("sigil_feed_streams_open", len(ds.clients), dataset=name)
        for state in ("pending", "waiting", "building", "retrying", "ready", "failed"):
            put("sigil_feed_cache_state", ds.cache.state == state, dataset=name, sigil_feed_cache_state=state)
        put("sigil_feed_cache_samples", ds.cache.samples, dataset=name)
        put("sigil_feed_cache_tokens", ds.cache.tokens, dataset=name)
        if ds.cache.path:
            put("sigil_feed_store_bytes", ds.cache.bytes, dataset=name)
            put("sigil_feed_store_fetched_bytes_total", ds.cache.bytes_fetched, dataset=name)
        put("sigil_feed_stream_blocks_total", ds.shared_reads.blocks_read, dataset=name, how="read")
        put("sigil_feed_stream_blocks_total", ds.shared_reads.blocks_shared, dataset=name, how="shared")
        put("sigil_feed_stream_samples_read_total", ds.shared_reads.samples_read, dataset=name)
        for src in ds.sources:
            put("sigil_feed_records_read_total", src.read, dataset=name, source=src.spec)
            put("sigil_feed_records_kept_total", src.kept, dataset=name, source=src.spec)
            for reason, count in src.dropped.items():
                put("sigil_feed_records_dropped_total", count, dataset=name, source=src.spec, reason=reason)
            for reason, count in src.malformed.items():
                put("sigil_feed_records_malformed_total", count, dataset=name, source=src.spec, reason=reason)
        for c in ds.clients:
            labels = {"dataset": name, "rank": str(c.rank), "world_size": str(c.world_size),
                      "client_id": c.client_id, "peer": c.peer}
            put("sigil_feed_client_lag_seconds", c.lag_s, **labels)
            put("sigil_feed_client_credits", c.credits, **labels)
            put("sigil_feed_client_batches", c.batches, **labels)
            view = c.input_bound
            if not view.reported:
                continue
            put("sigil_feed_client_input_bound_ratio", view.fraction_1m, **labels)
            put("sigil_feed_client_step_seconds_total", view.step_s, **labels)
            put("sigil_feed_client_steps_per_second", view.steps_per_s, **labels)
            put("sigil_feed_client_wait_seconds_sum", view.wait_s, **labels)
            total = 0
            for bucket in view.wait_histogram:
                total += bucket.count
                bound = "+Inf" if bucket.upper_s == float("inf") else repr(bucket.upper_s)
                put("sigil_feed_client_wait_seconds_bucket", total, **labels, le=bound)
            put("sigil_feed_client_wait_seconds_count", total, **labels)
        for job in ds.jobs:
            if job.input_bound.reported:
                put("sigil_feed_job_input_bound_ratio", job.input_bound.fraction_1m, dataset=name,
                    world_size=str(job.world_size))
                put("sigil_feed_job_slowest_rank", job.input_bound.slowest_rank, dataset=name,
                    world_size=str(job.world_size))
    return out


def test_metrics_render_the_numbers_get_stats_returns_at_the_same_moment(datasets: dict[str, ServedDataset],
                                                                          clock: list[float]) -> None:
    with ThreadPoolExecutor(1) as executor:
        service = DataFeedService(datasets, Limits(), executor)
        a = open_stream(service, "default", 0, 2, "trainer-a", credits=4)
        b = open_stream(service, "default", 1, 2, "trainer-b", credits=2)
        solo = open_stream(service, "default", 0, 1, "eval", credits=1)  # another job: world size 1
        quiet = open_stream(service, "stream", 0, 1, "no-timing", credits=3)
        gone = open_stream(service, "stream", 0, 1, "gone", credits=1)
        for stream, (wait, step) in ((a, (0.5, 2.0)), (b, (1.5, 2.0)), (solo, (0.1, 1.0))):
            for t in range(3):
                clock[0] += 0.5
                report(stream, wait, step)
                stream.throughput.add(100 * (t + 1))
                stream.client.batches += 1
                stream.client.tokens += 100 * (t + 1)
        quiet.client.batches = 7
        service.streams.remove(gone)
        clock[0] += 1.25  # the credits granted at open are owed by now

        calls: list[int] = []

        def stats() -> feed_pb2.Stats:
            calls.append(1)
            return service.stats()

        got = asyncio.run(service.GetStats(feed_pb2.GetStatsRequest(), None))  # type: ignore[arg-type]
        scraped = scrape(FeedCollector(stats, RpcStatuses()))
    assert calls == [1]  # one snapshot per scrape
    assert [d.name for d in got.datasets] == ["default", "stream"]
    default, stream = got.datasets
    assert (len(default.clients), default.streams_opened, stream.streams_opened, stream.streams_closed) == (3, 3, 2, 1)
    assert [(j.world_size, list(j.ranks), j.input_bound.slowest_client) for j in default.jobs] == [
        (1, [0], "eval"), (2, [0, 1], "trainer-b")]
    assert default.cache.state == "ready" and default.cache.bytes > 0 and default.batches_served > 0
    assert stream.shared_reads.blocks_read > 0 and dict(default.sources[0].malformed) == {"bad_json": 1}
    assert {c.client_id: c.lag_s for c in default.clients}["trainer-b"] == pytest.approx(5.75)
    assert {c.client_id: c.input_bound.reported for c in stream.clients} == {"no-timing": False}
    assert scraped == rendered(got)
