"""A served dataset: its config, tokenizer, fingerprints, counters and token store, and each rank's stage chain."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from ..protos import feed_pb2
from .cache.build import BuildProgress, build_store
from .cache.manifest import StoreDamaged, read_manifest
from .cache.order import epoch_batches, epoch_order
from .cache.owner import discard, reclaim
from .cache.pack import CachedPacker
from .cache.retry import BUILD_BACKOFF
from .cache.store import TokenStore, open_store
from .config import DatasetConfig, DatasetSection, FeedConfig
from .curate import CuratedSource, CurateRules
from .errors import ConfigError, RequestError, SourceError
from .filters import make_filter
from .mixing import Mixer
from .order import BlockShuffle
from .pack import Packer, TokenizedSamples
from .samples import ChatFormat, Sample, normalise, plain_pair
from .shared_read import SharedReads
from .sources import Source, open_source
from .stats import SourceCounters, Throughput
from .tokenize import EncodedBatch, Encoder, TokenFacts

log = logging.getLogger(__name__)

CONTENT_SETTINGS = ("names", "min_length", "max_length", "exclude_tests", "exclude_examples", "exclude_benches",
                    "prefer_idiomatic", "prefer_documented", "idiomatic_quality_ratio", "shuffle_seed",
                    "interleave_mode", "stopping_strategy", "dataset_weights", "task_weights", "splits",
                    "legacy_filters", "chat_template", "completion_only")
ORDER_SETTINGS = ("use_cache", "shuffle_block", "shuffle_block_chars", "remainder")
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
        self.cache_dir = Path(self.section.cache_dir) if self.section.cache_dir else default_cache_dir()
        self.progress = BuildProgress(state="ready" if not self.cached else "pending")
        self.store: TokenStore | None = None
        self.build_error: BaseException | None = None
        stored = self._stored_facts()
        self.facts = stored or self.encoder.facts()  # loads the tokenizer unless a store has them
        if stored is None:  # this dataset will encode: choose the backend now, so a forced one fails at start
            self.encoder.choose_backend(_first_samples(probes, self._pair_format()), chat=self.section.chat_template)
        self.ready = threading.Event()
        if not self.cached:
            self.ready.set()

    def _open(self, index: int) -> Source:
        return open_source(self.specs[index], index, base_dir=self.config.base_dir, cache_dir=self.section.cache_dir)

    @property
    def store_path(self) -> Path:
        """Where this dataset's token store lives."""
        return self.cache_dir / self.content_fingerprint

    def prepare(self, *, show_bar: bool = True) -> None:
        """Cached mode: open the token store, or (re)build it if it is missing or damaged; a build that fails
        with an OSError (disk full, a folder not writable) is retried with exponential backoff."""
        if not self.cached:
            return
        try:
            for attempt in range(1, BUILD_BACKOFF.attempts + 1):
                try:
                    self._prepare_once(show_bar)
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
            self.progress.state, self.progress.samples = "ready", len(self.store)
            self.progress.tokens, self.progress.error = self.store.manifest.tokens, ""
        except BaseException as err:
            self.progress.state, self.progress.error, self.build_error = "failed", str(err), err
            raise
        finally:
            self.ready.set()

    def _prepare_once(self, show_bar: bool) -> None:
        """One attempt: reclaim what dead builders left, then open the store or build it from scratch."""
        reclaim(self.cache_dir)
        self.store = self._open_store()
        if self.store is not None:
            return
        self.counters = [SourceCounters(spec) for spec in self.specs]  # a retry counts from zero again
        self.progress.samples = self.progress.tokens = 0
        build_store(self.mix(), self.encoder, cache_dir=self.cache_dir, fingerprint=self.content_fingerprint,
                    with_prompts=self.section.completion_only, progress=self.progress, show_bar=show_bar,
                    on_encoded=self._record_lengths,
                    meta=lambda: {"dataset": self.name, "sources": [c.snapshot() for c in self.counters]})
        self.store = self._open_store(verify=False)

    def _stored_facts(self) -> TokenFacts | None:
        """Token facts from an existing store's manifest, so a warm start needs no tokenizer."""
        if not self.cached:
            return None
        try:
            return read_manifest(self.store_path, self.content_fingerprint).token_facts
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

    def _open_store(self, verify: bool = True) -> TokenStore | None:
        if not self.store_path.exists():
            return None
        try:
            return open_store(self.store_path, self.content_fingerprint, verify=verify)
        except StoreDamaged as err:
            log.warning("token store damaged, rebuilding: %s", err)
            discard(self.store_path)
            return None

    def info(self) -> feed_pb2.DatasetInfo:
        """The dataset's facts, as sent to clients."""
        return feed_pb2.DatasetInfo(
            name=self.name, tokenizer=str(self.encoder.path), vocab_size=self.facts.vocab_size,
            eos_id=self.facts.eos_id, pad_id=self.facts.pad_id, max_seq_len=self.config.max_seq_len,
            pack=self.config.pack, completion_only=self.section.completion_only,
            mode="cached" if self.cached else "streaming", fingerprint=self.fingerprint, sources=self.specs)

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
            order = epoch_order(len(self.store), section.shuffle_seed, epoch)
            max_batches = epoch_batches(self.store, order, world_size=world_size, batch_size=batch_size,
                                        seq_len=seq_len, pack=self.config.pack, remainder=section.remainder)
            return CachedPacker(self.store, order, rank=rank, world_size=world_size, batch_size=batch_size,
                                seq_len=seq_len, pack=self.config.pack, completion_only=section.completion_only,
                                pad_id=self.facts.pad_id, remainder=section.remainder, max_batches=max_batches)
        block = -(-section.shuffle_block // world_size) * world_size  # equal shares of every full block
        order_stage = BlockShuffle(self.mix(), block_size=block, block_chars=section.shuffle_block_chars,
                                   seed=section.shuffle_seed, epoch=epoch, rank=rank, world_size=world_size,
                                   shared=self.shared_reads.cache(world_size, block_size=block,
                                                                  block_chars=section.shuffle_block_chars))
        samples = TokenizedSamples(order_stage, self.encoder, with_prompts=section.completion_only,
                                   on_encoded=self._record_lengths if epoch == 0 else _ignore)
        return Packer(samples, batch_size=batch_size, seq_len=seq_len, pack=self.config.pack,
                      completion_only=section.completion_only, pad_id=self.facts.pad_id,
                      remainder=section.remainder)

    def _record_lengths(self, samples: list[Sample], encoded: EncodedBatch) -> None:
        sources = np.fromiter((s.source for s in samples), dtype=np.int64, count=len(samples))
        lengths = encoded.lengths
        for source in np.unique(sources):
            self.counters[source].add_lengths(lengths[sources == source])

    def cache_state(self) -> feed_pb2.CacheState:
        """The token store's state and build progress."""
        return feed_pb2.CacheState(state=self.progress.state, samples=self.progress.samples,
                                   tokens=self.progress.tokens, path=str(self.store_path) if self.cached else "",
                                   error=self.progress.error)


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
