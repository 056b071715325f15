"""The server's state as protocol messages: a dataset's facts, its token store's state, a source's accounting,
streaming's shared reads, a stream's client and the input-bound views."""

from __future__ import annotations

from typing import Any

from ...protos import feed_pb2
from ...protos.constants import WAIT_BUCKETS_S
from ..feed.membership import Memberships
from ..feed.served import ServedDataset
from ..observe.input_bound import InputBoundView, JobView, input_bound
from ..observe.streams import OpenStream
from ..pipeline.accounting import LENGTH_BUCKETS, SourceCounters
from ..streaming.shared_reads import ReadCounts

WAIT_BOUNDS = (*WAIT_BUCKETS_S, float("inf"))
"""The upper bounds of the wait histogram's buckets (the last counts the waits above WAIT_BUCKETS_S)."""


def dataset_info(dataset: ServedDataset) -> feed_pb2.DatasetInfo:
    """The dataset's facts, as sent to clients."""
    facts, section = dataset.facts, dataset.section
    return feed_pb2.DatasetInfo(
        name=dataset.name, tokenizer=str(dataset.encoder.path), vocab_size=facts.vocab_size, eos_id=facts.eos_id,
        pad_id=facts.pad_id, max_seq_len=dataset.config.max_seq_len, pack=dataset.config.pack,
        completion_only=section.completion_only, mode="cached" if dataset.cached else "streaming",
        fingerprint=dataset.fingerprint, sources=dataset.specs, virtual_ranks=dataset.virtual)


def epoch_members(memberships: Memberships) -> list[feed_pb2.EpochMembers]:
    """The files each recent epoch serves, as fixed when it first opened here (oldest first)."""
    fixed = memberships.fixed()
    return [feed_pb2.EpochMembers(epoch=epoch, content=members.fingerprint, files=members.counts)
            for epoch, members in fixed]


def mixture_stats(dataset: ServedDataset, epoch: int) -> feed_pb2.MixtureStats:
    """The configured mixture of `epoch` (at its row 0), the rows inside it where a phase starts, the schedule's next
    change, and the changes accepted on resume."""
    mixtures = dataset.mixtures
    mixture, change = mixtures.at(epoch), mixtures.next_change(epoch)
    return feed_pb2.MixtureStats(epoch=epoch, dataset_weights=dict(zip(dataset.specs, mixture.weights, strict=True)),
                                 task_weights=mixture.task_weights or {},
                                 next_change_epoch=-1 if change is None else change,
                                 accepted_changes=mixtures.changes, change_rows=mixtures.rows_inside(epoch))


def source_stats(counters: SourceCounters) -> feed_pb2.SourceStats:
    """One source's accounting."""
    with counters.lock:
        buckets = [feed_pb2.LengthBucket(upper=int(u), count=int(c))
                   for u, c in zip(LENGTH_BUCKETS, counters.lengths, strict=True) if c]
        return feed_pb2.SourceStats(spec=counters.spec, read=counters.read, kept=counters.kept,
                                    dropped=dict(counters.dropped), malformed=dict(counters.malformed),
                                    tokens=counters.tokens, lengths=buckets)


def store_state(dataset: ServedDataset) -> feed_pb2.CacheState:
    """The token store's state and build progress; once it serves, its size, the bytes this process fetched
    from it and (a remote store) the shard cache's counters and the working set of the ranks reading it."""
    progress = dataset.progress
    state = feed_pb2.CacheState(state=progress.state, samples=progress.samples, tokens=progress.tokens,
                                path=dataset.store_path if dataset.cached else "", error=progress.error)
    store = dataset.store
    if store is None or progress.state != "ready":
        return state
    state.bytes, state.shards = store.manifest.bytes, len(store.manifest.shards)
    state.bytes_fetched = store.bytes_fetched()
    cache = store.shards.cache
    if cache is not None:
        c = cache.stats()
        state.shard_cache.CopyFrom(feed_pb2.ShardCacheStats(
            dir=str(cache.dir), bytes=c.current_bytes, max_bytes=c.max_bytes, shards=c.shards, hits=c.hits,
            misses=c.misses, hit_rate=c.hit_rate, fetches=c.fetches, bytes_fetched=c.bytes_fetched,
            evictions=c.evictions, checksum_failures=c.checksum_failures, refetches=c.refetches,
            thrashing=c.thrashing))
    ranks = dataset.working_set
    if ranks is not None:
        needs = ranks.needs
        state.working_set_bytes = needs.peak_bytes
        state.working_set.CopyFrom(feed_pb2.WorkingSet(
            epoch=ranks.epoch, world_size=ranks.world_size, ranks=ranks.ranks, virtual_ranks=needs.virtual,
            epoch_bytes=needs.epoch_bytes, shards=needs.shards, fits=ranks.fits))
    return state


def shared_reads(counts: ReadCounts) -> feed_pb2.SharedReads:
    """How a streaming dataset's ranks got their blocks."""
    with counts.lock:
        return feed_pb2.SharedReads(blocks_read=counts.blocks_read, blocks_shared=counts.blocks_shared,
                                    samples_read=counts.samples_read)


def input_bound_view(view: InputBoundView) -> feed_pb2.InputBound:
    """The input-bound view of a client or a group, the wait histogram over the protocol's buckets."""
    if not view.reported:
        return feed_pb2.InputBound()
    counts = [*map(int, view.wait_counts[: len(WAIT_BOUNDS)])]
    counts += [0] * (len(WAIT_BOUNDS) - len(counts))
    return feed_pb2.InputBound(
        reported=True, fraction_1m=view.fraction_1m, fraction_total=view.fraction_total,
        steps_per_s=view.steps_per_s, steps=view.steps, wait_s=view.wait_s, step_s=view.step_s,
        slowest_rank=view.slowest_rank, slowest_client=view.slowest_client,
        wait_histogram=[feed_pb2.WaitBucket(upper_s=b, count=c) for b, c in zip(WAIT_BOUNDS, counts, strict=True)])


def job_stats(job: JobView) -> feed_pb2.JobStats:
    """One job's ranks and input-bound view."""
    return feed_pb2.JobStats(world_size=job.world_size, ranks=job.ranks, input_bound=input_bound_view(job.input_bound))


def client_stats(stream: OpenStream[Any]) -> feed_pb2.ClientStats:
    """One open stream: its client, position, credits, rates and input-bound view."""
    client = stream.client
    return feed_pb2.ClientStats(
        peer=client.peer, client_id=client.client_id, rank=client.rank, world_size=client.world_size,
        epoch=client.epoch, batches=client.batches, tokens=client.tokens, credits=stream.credits.available,
        connected_s=client.connected_s(), lag_s=stream.credits.lag_s(), tokens_per_s=stream.throughput.rate(),
        batches_per_s=stream.throughput.batch_rate(),
        input_bound=input_bound_view(input_bound([(client.rank, client.client_id, stream.steps)])))
