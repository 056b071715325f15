"""A served dataset: its config, tokenizer, fingerprints, counters and token store, and each rank's stage chain."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..protos import feed_pb2
from .blocks import TokenizedBlocks, TokenStream
from .cache.order import EpochLayout, epoch_layout, served_sequence, virtual_ranks
from .cache.pack import CachedPacker
from .config import DatasetConfig, DatasetSection, FeedConfig
from .curate import CuratedSource, CurateRules
from .deal import Deal
from .errors import ConfigError, RequestError, SourceError
from .filters import make_filter
from .mixing import Mixer
from .order import BlockShuffle
from .pack import Packer
from .samples import ChatFormat, Sample, normalise, plain_pair
from .shared_read import SharedReads
from .sources import Source, open_source
from .stats import SourceCounters, Throughput
from .store.build_local import BuildProgress, SourcePlan, StoreBuilder, build_store
from .store.format import MANIFEST, StoreDamaged, StoreOutdated, read_manifest, store_dir
from .store.fs import is_uri, resolve
from .store.lease import HolderInfo, Lease, LeaseLost, has_lease, wait_or_build
from .store.owner import reclaim
from .store.reader import TokenStore, open_store
from .store.retry import BUILD_BACKOFF
from .store.shard_cache import shared_cache
from .tokenize import EncodedBatch, Encoder, TokenFacts

log = logging.getLogger(__name__)

CONTENT_SETTINGS = ("names", "min_length", "max_length", "exclude_tests", "exclude_examples", "exclude_benches",
                    "prefer_idiomatic", "prefer_documented", "idiomatic_quality_ratio", "splits",
                    "legacy_filters", "chat_template", "completion_only")
"""What decides which samples exist and their tokens: part of the token store's fingerprint."""
ORDER_SETTINGS = ("use_cache", "shuffle_block", "shuffle_block_chars", "remainder", "shuffle_seed",
                  "interleave_mode", "stopping_strategy", "dataset_weights", "task_weights", "virtual_ranks",
                  "shuffle_window_shards", "shard_records")
"""Serve-time decisions (order, mixing, task-weight copies): in the served fingerprint, not the store's."""
LAYOUTS_KEPT = 3
"""Cached mode: epoch layouts kept per dataset (the epoch being served, the one before for ranks that lag, and
the next one, computed in the background)."""
LAYOUT_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layout")
PROBE_RECORDS = 16  # per source: the first records are part of the tokenizer backend's exactness probe


def default_cache_dir() -> Path:
    """Where token stores live when `dataset.cache_dir` is not set."""
    return Path(os.environ.get("SIGIL_FEED_CACHE", Path.home() / ".cache" / "sigil-feed"))


class ServedDataset:
    """Everything the server knows about one dataset; opens a fresh stage chain per stream."""

    def __init__(self, config: DatasetConfig, config_file: str, encoder: Encoder | None = None) -> None:
        self.config, self.section = config, config.dataset
        self.name, self.cached = config.name, config.dataset.use_cache
        self.encoder = encoder or Encoder(config.tokenizer, base_dir=config.base_dir, file=config_file,
                                          backend=config.dataset.tokenizer_backend)
        self.specs = [s.name for s in self.section.names]
        probes = [self._open(i) for i in range(len(self.specs))]  # fails fast on missing sources
        self.weights = _source_weights(self.section, self.specs, config_file)
        self.filter = make_filter(self.section)
        self.counters = [SourceCounters(spec) for spec in self.specs]
        self.throughput = Throughput()
        self.shared_reads = SharedReads()  # streaming: the ranks of a layout share each block's read
        self.content_fingerprint = _fingerprint(self.section.model_dump(mode="json", include=set(CONTENT_SETTINGS)),
                                                [p.identity() for p in probes],
                                                self.encoder.fingerprint)
        self.fingerprint = _fingerprint(self.section.model_dump(mode="json", include=set(ORDER_SETTINGS)),
                                        self.config.pack, self.content_fingerprint)
        self.store_fs = resolve(self.section.cache_dir or default_cache_dir())
        self.store_dir = store_dir(self.store_fs, self.content_fingerprint)
        self.progress = BuildProgress(state="ready" if not self.cached else "pending")
        self.store: TokenStore | None = None
        self.sequence = np.zeros(0, dtype=np.int64)  # the served sequence of store samples (cached mode)
        self.virtual = 1  # cached mode: V, the epoch's virtual ranks
        self.layouts: OrderedDict[int, Future[EpochLayout]] = OrderedDict()  # the last LAYOUTS_KEPT epochs' layouts
        self.layouts_lock = threading.Lock()
        self.build_error: BaseException | None = None
        stored = self._stored_facts()
        self.facts = stored or self.encoder.facts()  # loads the tokenizer unless a store has them
        if stored is None:  # this dataset will encode: choose the backend now, so a forced one fails at start
            self.encoder.choose_backend(_first_samples(probes, self._pair_format()), chat=self.section.chat_template)
        self.ready = threading.Event()
        if not self.cached:
            self.ready.set()

    def _open(self, index: int) -> Source:
        return self._opener(index)()

    def _opener(self, index: int) -> Callable[[], Source]:
        """A picklable function that opens source `index` afresh (a build engine may call it elsewhere)."""
        hf_cache = self.section.cache_dir if self.section.cache_dir and not is_uri(self.section.cache_dir) else None
        return partial(open_source, self.specs[index], index, base_dir=self.config.base_dir, cache_dir=hf_cache)

    @property
    def store_path(self) -> str:
        """Where this dataset's token store lives: a local path or a URI."""
        return self.store_fs.uri(self.store_dir)

    @property
    def shard_cache_dir(self) -> Path:
        """Where a remote store's shards are cached (a local store is read where it lies)."""
        configured = self.section.shard_cache_dir
        return Path(configured).expanduser() if configured else default_cache_dir() / "shards"

    def prepare(self, *, show_bar: bool = True, serve: bool = True, build: StoreBuilder = build_store) -> None:
        """Cached mode: open the token store; if it is missing or damaged, build it with `build` (an engine's
        build_store) under the store's build lease, or wait (state `waiting`) while another process holds the
        lease and builds it. A build that fails with an OSError (disk full, a folder not writable) is retried
        with exponential backoff. `serve`: a remote store is opened for reading through the shard cache
        (`cache build` reads no tokens)."""
        if not self.cached:
            return
        try:
            for attempt in range(1, BUILD_BACKOFF.attempts + 1):
                try:
                    self._prepare_once(show_bar, serve, build)
                    break
                except OSError as err:
                    if attempt == BUILD_BACKOFF.attempts:
                        raise
                    delay = BUILD_BACKOFF.delay(attempt)
                    self.progress.state = "retrying"
                    self.progress.error = BUILD_BACKOFF.describe(attempt, err, delay)
                    log.warning("dataset %s: token store build %s", self.name, self.progress.error)
                    time.sleep(delay)
            assert self.store is not None
            self.counters = [SourceCounters.restore(s.model_dump()) for s in self.store.manifest.sources]
            self.sequence = served_sequence(self.store, sources=len(self.specs), mode=self.section.interleave_mode,
                                            stopping=self.section.stopping_strategy, weights=self.weights,
                                            task_weights=self.section.task_weights,
                                            seed=self.section.shuffle_seed or 0)
            self.virtual = virtual_ranks(self.section.virtual_ranks, len(self.sequence))  # ValueError: too many
            self.progress.state, self.progress.samples = "ready", len(self.store)
            self.progress.tokens, self.progress.error = self.store.manifest.tokens, ""
        except BaseException as err:
            self.progress.state, self.progress.error, self.build_error = "failed", str(err), err
            raise
        finally:
            self.ready.set()

    def _prepare_once(self, show_bar: bool, serve: bool, build: StoreBuilder) -> None:
        """One attempt: reclaim what dead builders left, then open the store, or build it if this process wins
        the build lease, or wait for the process that holds it (taken over if that process dies)."""
        if self.store_fs.is_local:
            reclaim(Path(self.store_fs.root))
            reclaim(Path(self.store_dir) / "shards")

        def opened() -> bool:
            self.store = self._open_store(serve=serve)
            return self.store is not None

        if opened():
            return
        if not has_lease(self.store_path):
            log.warning("dataset %s: no build lease on %s, so this server builds without electing a builder",
                        self.name, self.store_path)
            self._build(show_bar, serve, build, None)
            return
        while True:
            try:
                wait_or_build(self.store_path, partial(self._build, show_bar, serve, build), opened,
                              on_wait=self._waiting)
                return
            except LeaseLost as err:
                log.warning("dataset %s: %s; waiting for it", self.name, err)

    def _build(self, show_bar: bool, serve: bool, build: StoreBuilder, lease: Lease | None) -> None:
        """Build (or finish) the store, stopping if the lease is taken over; then open it."""
        self.progress.samples = self.progress.tokens = 0  # a retry counts from zero again
        build(self._source_plans(), self.encoder, fs=self.store_fs, store=self.store_dir,
              fingerprint=self.content_fingerprint, dataset=self.name, with_prompts=self.section.completion_only,
              progress=self.progress, show_bar=show_bar, check=lease.check if lease is not None else lambda: None)
        self.store = self._open_store(serve=serve, verify=False)

    def _waiting(self, holder: HolderInfo | None) -> None:
        """Another process holds the build lease: say who in GetStats, and in the log when it changes."""
        text = holder.describe() if holder is not None else "waiting for the build lease (just released)"
        if holder is not None and (self.progress.state != "waiting" or holder.label not in self.progress.error):
            log.info("dataset %s: token store %s: %s", self.name, self.store_path, text)
        self.progress.state, self.progress.error = "waiting", text
        self.progress.samples = self.progress.tokens = 0

    def _source_plans(self) -> list[SourcePlan]:
        """What the store builder reads: every source with its rules, task weights left to serve time."""
        plans = []
        for index, spec in enumerate(self.section.names):
            rules = CurateRules(filter=self.filter, filter_override=spec.filter, splits=frozenset(self.section.splits),
                                task_weights=None, seed=0, strict=self.section.on_bad_record == "fail",
                                pair_format=self._pair_format())
            plans.append(SourcePlan(spec.name, list(self._open(index).files), self._opener(index), rules,
                                    self.section.shard_records))
        return plans

    def _stored_facts(self) -> TokenFacts | None:
        """Token facts from an existing store's manifest, so a warm start needs no tokenizer."""
        if not self.cached:
            return None
        try:
            return read_manifest(self.store_fs, self.store_dir, self.content_fingerprint).token_facts
        except StoreDamaged:
            return None

    def prepare_in_background(self) -> None:
        """Start `prepare` in a thread; streams wait for it (see `wait_ready`)."""
        if self.cached:
            threading.Thread(target=self._prepare_logged, name=f"prepare-{self.name}", daemon=True).start()

    def _prepare_logged(self) -> None:
        try:
            self.prepare()
        except Exception:
            log.exception("dataset %s: building the token store failed", self.name)

    def wait_ready(self) -> None:
        """Block until the dataset can serve; UNAVAILABLE if its token store could not be built, DATA_LOSS
        if a bad record stopped the build (on_bad_record: fail), which no retry can get past."""
        self.ready.wait()
        if self.progress.state == "failed":
            message = f"dataset {self.name!r}: token store build failed: {self.progress.error}"
            if isinstance(self.build_error, SourceError):
                raise SourceError(message)
            raise RequestError(grpc.StatusCode.UNAVAILABLE, message)

    def _open_store(self, *, serve: bool, verify: bool = True) -> TokenStore | None:
        """The committed store, or None if there is none or it must be rebuilt (which rewrites only the shards
        that are not complete and valid; a store in place is never deleted). `serve`: a remote store's shards
        are read through the process's shard cache for shard_cache_dir."""
        if not self.store_fs.exists(f"{self.store_dir}/{MANIFEST}"):
            return None
        cache = None
        if serve and not self.store_fs.is_local:
            cache = shared_cache(self.shard_cache_dir, int(self.section.shard_cache_gb * 1e9),
                                 any_slot=self.section.shard_cache_dir is None)
        try:
            return open_store(self.store_fs, self.store_dir, self.content_fingerprint, shard_cache=cache,
                              verify=verify)
        except StoreOutdated as err:
            log.warning("token store format %s at %s: rebuilding as format 2", err.format, self.store_path)
        except StoreDamaged as err:
            log.warning("token store damaged, rebuilding: %s", err)
        return None

    def info(self) -> feed_pb2.DatasetInfo:
        """The dataset's facts, as sent to clients."""
        return feed_pb2.DatasetInfo(
            name=self.name, tokenizer=str(self.encoder.path), vocab_size=self.facts.vocab_size,
            eos_id=self.facts.eos_id, pad_id=self.facts.pad_id, max_seq_len=self.config.max_seq_len,
            pack=self.config.pack, completion_only=self.section.completion_only,
            mode="cached" if self.cached else "streaming", fingerprint=self.fingerprint, sources=self.specs,
            virtual_ranks=self.virtual)

    def mix(self) -> Mixer:
        """A fresh chain sources -> curate -> mix, counting into this dataset's counters."""
        section = self.section
        seed = section.shuffle_seed or 0
        pair_format = self._pair_format()
        children = []
        for index, spec in enumerate(section.names):
            rules = CurateRules(filter=self.filter, filter_override=spec.filter, splits=frozenset(section.splits),
                                task_weights=section.task_weights, seed=seed, strict=section.on_bad_record == "fail",
                                pair_format=pair_format)
            children.append(CuratedSource(self._open(index), rules, self.counters[index]))
        return Mixer(children, section.interleave_mode, section.stopping_strategy, self.weights, seed)

    def _pair_format(self) -> ChatFormat:
        return self.encoder.chat_format if self.section.chat_template else plain_pair

    def packer(self, *, epoch: int, rank: int, world_size: int, batch_size: int, seq_len: int) -> Packer | CachedPacker:
        """One rank's epoch as a stage chain ending in a packer."""
        section = self.section
        if self.store is not None:
            return CachedPacker(self.store, self.layout(epoch), Deal(rank, world_size, batch_size), seq_len=seq_len,
                                pack=self.config.pack, completion_only=section.completion_only,
                                pad_id=self.facts.pad_id, remainder=section.remainder)
        blocks_order = BlockShuffle(self.mix(), block_size=section.shuffle_block,
                                    block_chars=section.shuffle_block_chars, seed=section.shuffle_seed, epoch=epoch)
        blocks = TokenizedBlocks(blocks_order, self.encoder, with_prompts=section.completion_only,
                                 on_encoded=self._record_lengths if epoch == 0 else _ignore,
                                 shared=self.shared_reads.cache(world_size, block_chars=section.shuffle_block_chars))
        return Packer(TokenStream(blocks), Deal(rank, world_size, batch_size), seq_len=seq_len, pack=self.config.pack,
                      completion_only=section.completion_only, pad_id=self.facts.pad_id, remainder=section.remainder)

    def layout(self, epoch: int) -> EpochLayout:
        """Cached mode: the epoch's layout over the virtual ranks, computed once for all the ranks that open it; the
        next epoch's is computed in the background meanwhile, so that an epoch's start does not wait for it."""
        with self.layouts_lock:
            current = self._layout_job(epoch)
            if self.section.epochs is None or epoch + 1 < self.section.epochs:
                self._layout_job(epoch + 1)
        return current.result()

    def _layout_job(self, epoch: int) -> Future[EpochLayout]:
        """The epoch's layout, computed or being computed on LAYOUT_POOL (call with layouts_lock held)."""
        job = self.layouts.get(epoch)
        if job is None:
            assert self.store is not None
            job = self.layouts[epoch] = LAYOUT_POOL.submit(
                epoch_layout, self.store, self.sequence, virtual=self.virtual, seed=self.section.shuffle_seed,
                epoch=epoch, window_shards=self.section.shuffle_window_shards, pack=self.config.pack)
            while len(self.layouts) > LAYOUTS_KEPT:
                self.layouts.popitem(last=False)
        self.layouts.move_to_end(epoch)
        return job

    def _record_lengths(self, samples: list[Sample], encoded: EncodedBatch) -> None:
        sources = np.fromiter((s.source for s in samples), dtype=np.int64, count=len(samples))
        lengths = encoded.lengths
        for source in np.unique(sources):
            self.counters[source].add_lengths(lengths[sources == source])

    def cache_state(self) -> feed_pb2.CacheState:
        """The token store's state and build progress; once it serves, its size, the bytes this process fetched
        from it and (a remote store) the shard cache's counters."""
        state = feed_pb2.CacheState(state=self.progress.state, samples=self.progress.samples,
                                    tokens=self.progress.tokens, path=str(self.store_path) if self.cached else "",
                                    error=self.progress.error)
        store = self.store
        if store is None or self.progress.state != "ready":
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


def open_datasets(config: FeedConfig) -> dict[str, ServedDataset]:
    """Open every configured dataset (tokenizers shared); raises ConfigError/SourceError on bad input."""
    encoders: dict[tuple[str, str], Encoder] = {}
    datasets = {}
    for name, dataset_config in config.datasets.items():
        key = (dataset_config.tokenizer, dataset_config.dataset.tokenizer_backend)
        dataset = ServedDataset(dataset_config, config.file, encoders.get(key))
        encoders[key] = dataset.encoder
        datasets[name] = dataset
    return datasets


def _ignore(samples: list[Sample], encoded: EncodedBatch) -> None:
    """Lengths are recorded in epoch 0 only."""


def _first_samples(sources: list[Source], pair_format: ChatFormat) -> list[Sample]:
    """The first PROBE_RECORDS records of every source as samples (unfiltered, uncounted; bad ones left out)."""
    samples = []
    for source in sources:
        try:
            for record in islice(source, PROBE_RECORDS):
                sample = normalise(record, pair_format)
                if not isinstance(sample, str):
                    samples.append(sample)
        except SourceError:
            continue  # reading it for real reports the error where it belongs
    return samples


def _source_weights(section: DatasetSection, specs: list[str], file: str) -> list[float]:
    weights = section.dataset_weights or {}
    unknown = sorted(set(weights) - set(specs))
    if unknown:
        raise ConfigError(f"names no source of this dataset: {unknown}", key="dataset.dataset_weights",
                          file=file, fix=f"use the exact strings from dataset.names: {specs}")
    return [weights.get(spec, 1.0) for spec in specs]


def _fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
