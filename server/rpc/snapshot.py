"""One statistics snapshot: what GetStats returns, Prometheus renders and `top` shows, taken once per request or
scrape from the served datasets and the registry of open streams."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ...protos import feed_pb2
from ..feed.served import ServedDataset
from ..observe.input_bound import job_views
from ..observe.streams import Streams, StreamsNow
from .views import (
    client_stats,
    dataset_info,
    epoch_members,
    input_bound_view,
    job_stats,
    mixture_stats,
    shared_reads,
    source_stats,
    store_state,
)


def snapshot(datasets: Mapping[str, ServedDataset], streams: Streams[Any], uptime_s: float,
             names: Iterable[str] | None = None) -> feed_pb2.Stats:
    """The statistics of the datasets `names` (default: all of them, by name) at this moment."""
    now = streams.now()
    return feed_pb2.Stats(datasets=[dataset_stats(name, datasets[name], now) for name in names or sorted(datasets)],
                          uptime_s=uptime_s)


def dataset_stats(name: str, dataset: ServedDataset, now: StreamsNow[Any]) -> feed_pb2.DatasetStats:
    """One dataset: its facts, sources, store, serving counters, open streams and input-bound views."""
    streams = now.of(name)
    overall, jobs = job_views([(s.client.rank, s.client.world_size, s.client.client_id, s.steps) for s in streams])
    throughput = dataset.throughput
    return feed_pb2.DatasetStats(
        name=name, info=dataset_info(dataset), sources=[source_stats(c) for c in dataset.counters],
        clients=[client_stats(s) for s in streams], input_bound=input_bound_view(overall),
        jobs=[job_stats(j) for j in jobs], cache=store_state(dataset), batches_served=throughput.batches,
        tokens_served=throughput.tokens, tokens_per_s=throughput.rate(), streams_opened=now.opened.get(name, 0),
        streams_closed=now.closed.get(name, 0), shared_reads=shared_reads(dataset.shared_reads.counts),
        epoch_members=epoch_members(dataset.memberships),
        mixture=mixture_stats(dataset, dataset.mixtures.latest_epoch))
