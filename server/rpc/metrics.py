"""Prometheus metrics: each scrape renders one statistics snapshot (the Stats message GetStats returns, see
snapshot.py), so the serving path does no extra work and /metrics and GetStats never disagree."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from ...protos import feed_pb2
from ..errors import ConfigError

CACHE_STATES = ("pending", "waiting", "building", "retrying", "ready", "failed")
CLIENT_LABELS = ["dataset", "rank", "world_size", "client_id", "peer"]


class RpcStatuses:
    """Finished RPCs by (method, status code); fed by the error interceptor, once per RPC."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def record(self, method: str, code: grpc.StatusCode) -> None:
        """Count one finished RPC."""
        with self._lock:
            self.counts[method, code.name] += 1

    def snapshot(self) -> list[tuple[tuple[str, str], int]]:
        """The counts so far."""
        with self._lock:
            return list(self.counts.items())


class FeedCollector(Collector):
    """Builds every sigil-feed metric from one statistics snapshot when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], feed_pb2.Stats], statuses: RpcStatuses) -> None:
        self.stats, self.statuses = stats, statuses

    def collect(self) -> Iterator[Metric]:
        """All metric families, from a snapshot taken now."""
        datasets = list(self.stats().datasets)
        yield from _datasets(datasets)
        yield from _stores(datasets)
        yield from _shared_reads(datasets)
        yield from _sources(datasets)
        yield from _clients(datasets)
        yield from _timing(datasets)
        rpcs = CounterMetricFamily("sigil_feed_rpcs", "RPCs finished, by method and status code (errors: code != OK)",
                                   labels=["method", "code"])
        for (method, code), count in self.statuses.snapshot():
            rpcs.add_metric([method, code], count)
        yield rpcs


def _datasets(datasets: list[feed_pb2.DatasetStats]) -> Iterator[Metric]:
    batches = CounterMetricFamily("sigil_feed_batches_served", "Batches sent to clients", labels=["dataset"])
    tokens = CounterMetricFamily("sigil_feed_tokens_served", "Real (non-padding) tokens sent to clients",
                                 labels=["dataset"])
    opened = CounterMetricFamily("sigil_feed_streams_opened", "Streams opened", labels=["dataset"])
    closed = CounterMetricFamily("sigil_feed_streams_closed", "Streams closed", labels=["dataset"])
    cache = StateSetMetricFamily("sigil_feed_cache_state", "Token store state", labels=["dataset"])
    cache_samples = GaugeMetricFamily("sigil_feed_cache_samples", "Samples written to the token store so far",
                                      labels=["dataset"])
    cache_tokens = GaugeMetricFamily("sigil_feed_cache_tokens", "Tokens written to the token store so far",
                                     labels=["dataset"])
    for ds in datasets:
        batches.add_metric([ds.name], ds.batches_served)
        tokens.add_metric([ds.name], ds.tokens_served)
        opened.add_metric([ds.name], ds.streams_opened)
        closed.add_metric([ds.name], ds.streams_closed)
        cache.add_metric([ds.name], {s: ds.cache.state == s for s in CACHE_STATES})
        cache_samples.add_metric([ds.name], ds.cache.samples)
        cache_tokens.add_metric([ds.name], ds.cache.tokens)
    yield from (batches, tokens, opened, closed, cache, cache_samples, cache_tokens)


def _stores(datasets: list[feed_pb2.DatasetStats]) -> Iterator[Metric]:
    """Each token store's size and the bytes fetched from it; a remote store's shard cache."""
    labels = ["dataset"]
    size = GaugeMetricFamily("sigil_feed_store_bytes", "The token store's size (every shard's files)", labels=labels)
    fetched = CounterMetricFamily("sigil_feed_store_fetched_bytes", "Bytes this server read from a remote token store",
                                  labels=labels)
    cached = GaugeMetricFamily("sigil_feed_shard_cache_bytes", "Bytes in the node-local shard cache", labels=labels)
    budget = GaugeMetricFamily("sigil_feed_shard_cache_max_bytes", "The shard cache's budget", labels=labels)
    hits = CounterMetricFamily("sigil_feed_shard_cache_hits", "Shard reads answered from the shard cache",
                               labels=labels)
    misses = CounterMetricFamily("sigil_feed_shard_cache_misses", "Shard reads that waited for a download",
                                 labels=labels)
    evictions = CounterMetricFamily("sigil_feed_shard_cache_evictions", "Shards evicted from the shard cache",
                                    labels=labels)
    failures = CounterMetricFamily("sigil_feed_shard_cache_checksum_failures",
                                   "Shard downloads that failed their checksum", labels=labels)
    refetches = CounterMetricFamily("sigil_feed_shard_cache_refetches",
                                    "Downloads of shards the shard cache had evicted (many: it thrashes)",
                                    labels=labels)
    thrashing = GaugeMetricFamily("sigil_feed_shard_cache_thrashing",
                                  "1 while most shard fetches are refetches (eviction is then scan-resistant)",
                                  labels=labels)
    working = GaugeMetricFamily("sigil_feed_shard_cache_working_set_bytes",
                                "The most bytes of shards this server's ranks read at once in their epoch: the shard "
                                "cache must hold this much to fetch each shard about once", labels=labels)
    share = GaugeMetricFamily("sigil_feed_store_epoch_share_bytes",
                              "Bytes of every shard this server's ranks read in their epoch", labels=labels)
    for ds in datasets:
        state = ds.cache
        if state.state != "ready" or not state.path:
            continue
        size.add_metric([ds.name], state.bytes)
        fetched.add_metric([ds.name], state.bytes_fetched)
        if state.HasField("shard_cache"):
            c = state.shard_cache
            for family, value in ((cached, c.bytes), (budget, c.max_bytes), (hits, c.hits), (misses, c.misses),
                                  (evictions, c.evictions), (failures, c.checksum_failures),
                                  (refetches, c.refetches), (thrashing, int(c.thrashing))):
                family.add_metric([ds.name], value)
        if state.HasField("working_set"):
            working.add_metric([ds.name], state.working_set_bytes)
            share.add_metric([ds.name], state.working_set.epoch_bytes)
    yield from (size, fetched, cached, budget, hits, misses, evictions, failures, refetches, thrashing, working, share)


def _shared_reads(datasets: list[feed_pb2.DatasetStats]) -> Iterator[Metric]:
    blocks = CounterMetricFamily("sigil_feed_stream_blocks", "Streaming shuffle blocks the ranks took: read from "
                                 "the sources, or shared (another rank's read)", labels=["dataset", "how"])
    samples = CounterMetricFamily("sigil_feed_stream_samples_read", "Samples streaming ranks read from the "
                                  "sources, every pass (a shared read counts once)", labels=["dataset"])
    for ds in datasets:
        blocks.add_metric([ds.name, "read"], ds.shared_reads.blocks_read)
        blocks.add_metric([ds.name, "shared"], ds.shared_reads.blocks_shared)
        samples.add_metric([ds.name], ds.shared_reads.samples_read)
    yield from (blocks, samples)


def _sources(datasets: list[feed_pb2.DatasetStats]) -> Iterator[Metric]:
    labels = ["dataset", "source"]
    read = CounterMetricFamily("sigil_feed_records_read", "Records read from each source", labels=labels)
    kept = CounterMetricFamily("sigil_feed_records_kept", "Records that passed the filters", labels=labels)
    dropped = CounterMetricFamily("sigil_feed_records_dropped", "Records dropped by a filter, by reason",
                                  labels=[*labels, "reason"])
    malformed = CounterMetricFamily("sigil_feed_records_malformed", "Malformed records skipped, by reason",
                                    labels=[*labels, "reason"])
    for ds in datasets:
        for source in ds.sources:
            read.add_metric([ds.name, source.spec], source.read)
            kept.add_metric([ds.name, source.spec], source.kept)
            for reason, count in source.dropped.items():
                dropped.add_metric([ds.name, source.spec, reason], count)
            for reason, count in source.malformed.items():
                malformed.add_metric([ds.name, source.spec, reason], count)
    yield from (read, kept, dropped, malformed)


def _clients(datasets: list[feed_pb2.DatasetStats]) -> Iterator[Metric]:
    open_streams = GaugeMetricFamily("sigil_feed_streams_open", "Streams open now", labels=["dataset"])
    lag = GaugeMetricFamily("sigil_feed_client_lag_seconds",
                            "How long the client's oldest granted, unsent batch has been owed", labels=CLIENT_LABELS)
    credits = GaugeMetricFamily("sigil_feed_client_credits", "Batches granted by the client and not yet sent",
                                labels=CLIENT_LABELS)
    position = GaugeMetricFamily("sigil_feed_client_batches", "Batches sent on the client's stream",
                                 labels=CLIENT_LABELS)
    for ds in datasets:
        open_streams.add_metric([ds.name], len(ds.clients))
        for client in ds.clients:
            labels = _client_labels(ds.name, client)
            lag.add_metric(labels, client.lag_s)
            credits.add_metric(labels, client.credits)
            position.add_metric(labels, client.batches)
    yield from (open_streams, lag, credits, position)


def _timing(datasets: list[feed_pb2.DatasetStats]) -> Iterator[Metric]:
    """The training loops' data wait, as their clients report it, per client and per job."""
    ratio = GaugeMetricFamily("sigil_feed_client_input_bound_ratio",
                              "Share of the training loop's step time spent waiting for data, last minute",
                              labels=CLIENT_LABELS)
    wait = HistogramMetricFamily("sigil_feed_client_wait_seconds",
                                 "Data wait per training step, as the client measures it", labels=CLIENT_LABELS)
    step = CounterMetricFamily("sigil_feed_client_step_seconds", "Training step time reported by the client",
                               labels=CLIENT_LABELS)
    rate = GaugeMetricFamily("sigil_feed_client_steps_per_second", "Training steps per second, last minute",
                             labels=CLIENT_LABELS)
    job_ratio = GaugeMetricFamily("sigil_feed_job_input_bound_ratio",
                                  "Share of step time the ranks of a job (one world size) wait for data, last "
                                  "minute", labels=["dataset", "world_size"])
    slowest = GaugeMetricFamily("sigil_feed_job_slowest_rank", "The job's rank waiting longest for data",
                                labels=["dataset", "world_size"])
    for ds in datasets:
        for client in ds.clients:
            view = client.input_bound
            if not view.reported:
                continue
            labels = _client_labels(ds.name, client)
            ratio.add_metric(labels, view.fraction_1m)
            buckets, total = [], 0
            for bucket in view.wait_histogram:
                total += bucket.count
                buckets.append(("+Inf" if bucket.upper_s == float("inf") else repr(bucket.upper_s), total))
            wait.add_metric(labels, buckets, view.wait_s)
            step.add_metric(labels, view.step_s)
            rate.add_metric(labels, view.steps_per_s)
        for job in ds.jobs:
            if job.input_bound.reported:
                job_ratio.add_metric([ds.name, str(job.world_size)], job.input_bound.fraction_1m)
                slowest.add_metric([ds.name, str(job.world_size)], job.input_bound.slowest_rank)
    yield from (ratio, wait, step, rate, job_ratio, slowest)


def _client_labels(dataset: str, client: feed_pb2.ClientStats) -> list[str]:
    return [dataset, str(client.rank), str(client.world_size), client.client_id, client.peer]


def serve_metrics(stats: Callable[[], feed_pb2.Stats], statuses: RpcStatuses, *, host: str,
                  port: int) -> WSGIServer:
    """Serve /metrics over HTTP in a background thread, each scrape rendering `stats()` (a snapshot taken
    then); returns the server (its port, and shutdown())."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(FeedCollector(stats, statuses))
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {err.strerror}", key="server.metrics_port",
                          fix="choose a free port (--metrics-port, env SIGIL_FEED_METRICS_PORT)") from None
    return server
