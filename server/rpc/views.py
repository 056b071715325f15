"""The server's state as protocol messages: a dataset's facts, its token store's state, a source's accounting."""

from __future__ import annotations

from ...protos import feed_pb2
from ..feed.served import ServedDataset
from ..pipeline.accounting import LENGTH_BUCKETS, SourceCounters


def dataset_info(dataset: ServedDataset) -> feed_pb2.DatasetInfo:
    """The dataset's facts, as sent to clients."""
    facts, section = dataset.facts, dataset.section
    return feed_pb2.DatasetInfo(
        name=dataset.name, tokenizer=str(dataset.encoder.path), vocab_size=facts.vocab_size, eos_id=facts.eos_id,
        pad_id=facts.pad_id, max_seq_len=dataset.config.max_seq_len, pack=dataset.config.pack,
        completion_only=section.completion_only, mode="cached" if dataset.cached else "streaming",
        fingerprint=dataset.fingerprint, sources=dataset.specs, virtual_ranks=dataset.virtual)


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
    from it and (a remote store) the shard cache's counters."""
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
            evictions=c.evictions, checksum_failures=c.checksum_failures))
    return state
