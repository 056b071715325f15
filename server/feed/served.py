"""A served dataset: its config, tokenizer, fingerprints and counters, and which stage chain each rank reads."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ..builders.lifecycle import StoreLifecycle
from ..builders.local_engine import BuildProgress, SourcePlan, StoreBuilder, build_store
from ..cached.layout import served_sequence, virtual_ranks
from ..cached.layouts import EpochLayouts
from ..cached.packer import CachedPacker
from ..cached.working_set import WorkingSet, working_set
from ..config import DatasetConfig, DatasetSection, FeedConfig
from ..errors import SourceError
from ..observe.throughput import Throughput
from ..pipeline.accounting import SourceCounters
from ..pipeline.curate import CuratedSource, CurateRules
from ..pipeline.filters import make_filter
from ..pipeline.mixing import Mixer
from ..pipeline.samples import ChatFormat, Sample, normalise, plain_pair
from ..pipeline.sources import Source, open_source
from ..pipeline.tokenize import EncodedBatch, Encoder
from ..rows.deal import Deal
from ..runtime import Runtime
from ..store.format import TokenFacts, store_dir
from ..store.fs import is_uri, resolve
from ..store.reader import TokenStore
from ..store.shard_cache import ShardCache
from ..streaming.block_order import BlockShuffle, Mix
from ..streaming.encoding import TokenizedBlocks, TokenStream
from ..streaming.packer import Packer
from ..streaming.shared_reads import SharedReads
from .mixtures import Mixture, Mixtures, Plan, plan_at

log = logging.getLogger(__name__)

CONTENT_SETTINGS = ("names", "min_length", "max_length", "exclude_tests", "exclude_examples", "exclude_benches",
                    "prefer_idiomatic", "prefer_documented", "idiomatic_quality_ratio", "splits",
                    "legacy_filters", "chat_template", "completion_only")
"""What decides which samples exist and their tokens: part of the token store's fingerprint."""
ORDER_SETTINGS = ("use_cache", "shuffle_block", "shuffle_block_chars", "remainder", "shuffle_seed",
                  "interleave_mode", "stopping_strategy", "virtual_ranks", "shuffle_window_shards", "shard_records")
"""Serve-time decisions (order, mixing): in the served fingerprint, not the store's. The mixture (dataset_weights,
task_weights) is not: a cursor carries its epoch's, so a resume under another one continues (mixtures.py)."""
ORDER_REVISION = 2
"""The epoch order's definition, in the served fingerprint: a cursor of another revision (revision 1 padded or cut
every virtual rank to the longest or shortest, so its rows mean others now) is refused, never resumed wrongly."""
PROBE_RECORDS = 16  # per source: the first records are part of the tokenizer backend's exactness probe
WORKING_SETS_KEPT = 32  # working sets remembered per dataset, by (epoch, world size, ranks)
WARN_AFTER_S = 2.0  # a working set larger than the shard cache is warned once no rank has opened for this long
CACHE_HEADROOM = 1.5
"""The shard cache to suggest for a working set: room for the shards fetched ahead and those pinned in transit."""


@dataclass(frozen=True)
class RanksWorkingSet:
    """The working set of the ranks of one world size that have an epoch open on this server."""

    epoch: int
    world_size: int
    ranks: tuple[int, ...]
    needs: WorkingSet
    budget: int  # the shard cache's max_bytes

    @property
    def fits(self) -> bool:
        """Whether the shard cache holds what the ranks read at once."""
        return self.needs.peak_bytes <= self.budget


def default_cache_dir() -> Path:
    """Where token stores live when `dataset.cache_dir` is not set."""
    return Path(os.environ.get("SIGIL_FEED_CACHE", Path.home() / ".cache" / "sigil-feed"))


class ServedDataset:
    """Everything the server knows about one dataset; opens a fresh stage chain per stream, on the pools and
    shard caches of `runtime`."""

    def __init__(self, config: DatasetConfig, config_file: str, encoder: Encoder | None = None, *,
                 runtime: Runtime) -> None:
        self.config, self.section, self.runtime = config, config.dataset, runtime
        self.name, self.cached = config.name, config.dataset.use_cache
        self.encoder = encoder or Encoder(config.tokenizer, base_dir=config.base_dir, file=config_file,
                                          backend=config.dataset.tokenizer_backend)
        self.specs = [s.name for s in self.section.names]
        self.files: list[list[str] | None] = [None] * len(self.specs)
        probes = [self._open(i) for i in range(len(self.specs))]  # fails fast on missing sources
        self.files = [list(p.files) for p in probes]  # fixed from here on (a Hub source ignores them)
        self.mixtures = Mixtures(self.section, self.specs, config_file)
        self.filter = make_filter(self.section)
        self.counters = [SourceCounters(spec) for spec in self.specs]
        self.throughput = Throughput()
        self.shared_reads = SharedReads()  # streaming: the ranks of a layout share each block's read
        self.content_fingerprint = _fingerprint(self.section.model_dump(mode="json", include=set(CONTENT_SETTINGS)),
                                                [p.identity() for p in probes],
                                                self.encoder.fingerprint)
        self.fingerprint = _fingerprint(self.section.model_dump(mode="json", include=set(ORDER_SETTINGS)),
                                        self.config.pack, self.content_fingerprint, ORDER_REVISION)
        fs = resolve(self.section.cache_dir or default_cache_dir())
        self.store_dir = store_dir(fs, self.content_fingerprint)
        self.lifecycle = StoreLifecycle(self.name, fs, self.store_dir, self.content_fingerprint,
                                        encoder=self.encoder, plans=self._source_plans,
                                        with_prompts=self.section.completion_only, shard_cache=self._shard_cache)
        self.layouts: EpochLayouts | None = None  # cached mode, once the store is open
        self.working_set: RanksWorkingSet | None = None  # a remote store: the latest ranks' working set
        self._open_epochs: weakref.WeakKeyDictionary[CachedPacker, tuple[int, int, int]] = \
            weakref.WeakKeyDictionary()  # each open epoch's (epoch, world size, rank)
        self._working_sets: OrderedDict[tuple[int, int, tuple[int, ...]], WorkingSet] = OrderedDict()
        self._latest: dict[tuple[int, int], tuple[int, RanksWorkingSet]] = {}  # by (epoch, world size), numbered
        self._opened = self._reported = 0  # epochs opened here; the number of the one self.working_set is of
        self._pending: dict[tuple[int, int], threading.Timer] = {}  # warnings waiting for the ranks to open
        self._warned: set[tuple[int, int, tuple[int, ...]]] = set()
        self._working_lock = threading.Lock()
        stored = self.lifecycle.stored_facts() if self.cached else None
        self.facts: TokenFacts = stored or self.encoder.facts()  # loads the tokenizer unless a store has them
        if stored is None:  # this dataset will encode: choose the backend now, so a forced one fails at start
            self.encoder.choose_backend(_first_samples(probes, self._pair_format()), chat=self.section.chat_template)
        if not self.cached:
            self.lifecycle.progress.state = "ready"
            self.lifecycle.ready.set()

    @property
    def progress(self) -> BuildProgress:
        """The token store's state and build progress (streaming mode: always `ready`)."""
        return self.lifecycle.progress

    @property
    def store(self) -> TokenStore | None:
        """The open token store (cached mode, once ready)."""
        return self.lifecycle.store

    @property
    def store_path(self) -> str:
        """Where this dataset's token store lives: a local path or a URI."""
        return self.lifecycle.path

    @property
    def virtual(self) -> int:
        """V, the epoch's virtual ranks (cached mode; 1 in streaming mode)."""
        return self.layouts.virtual if self.layouts is not None else 1

    @property
    def shard_cache_dir(self) -> Path:
        """Where a remote store's shards are cached (a local store is read where it lies)."""
        configured = self.section.shard_cache_dir
        return Path(configured).expanduser() if configured else default_cache_dir() / "shards"

    def _shard_cache(self) -> ShardCache:
        return self.runtime.shard_cache(self.shard_cache_dir, int(self.section.shard_cache_gb * 1e9),
                                        any_slot=self.section.shard_cache_dir is None)

    def _open(self, index: int) -> Source:
        return self._opener(index)()

    def _opener(self, index: int) -> Callable[[], Source]:
        """A picklable function that opens source `index` afresh (a build engine may call it elsewhere), over the
        files found at start: a file deleted or added since is no reason for the others to change their index
        (a deleted one reads as a bad file, counted)."""
        hf_cache = self.section.cache_dir if self.section.cache_dir and not is_uri(self.section.cache_dir) else None
        return partial(open_source, self.specs[index], index, base_dir=self.config.base_dir, cache_dir=hf_cache,
                       files=self.files[index])

    def prepare(self, *, show_bar: bool = True, serve: bool = True, build: StoreBuilder = build_store) -> None:
        """Cached mode: open (or build, or wait for) the token store, then lay out its served sequence."""
        if self.cached:
            self.lifecycle.prepare(self._serve_store, show_bar=show_bar, serve=serve, build=build)

    def _serve_store(self, store: TokenStore) -> None:
        """The store's accounting becomes the counters; its samples, mixed, the sequence epochs lay out."""
        section = self.section
        self.counters = [SourceCounters.restore(s.model_dump()) for s in store.manifest.sources]
        sequences = partial(_served_sequence, store, self.specs, section)
        items = len(sequences(self.mixtures.at(0), None))  # V is fixed by epoch 0's mixture, for the run's life
        self.layouts = EpochLayouts(store, sequences, self.mixtures.at,
                                    virtual=virtual_ranks(section.virtual_ranks, items),
                                    seed=section.shuffle_seed, window_shards=section.shuffle_window_shards,
                                    pack=self.config.pack, epochs=section.epochs, pool=self.runtime.layout_pool)

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
        """Block until the dataset can serve (see StoreLifecycle.wait_ready)."""
        self.lifecycle.wait_ready()

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

    def mix(self, mixture: Mixture | None = None) -> Mixer:
        """A fresh chain sources -> curate -> mix under `mixture` (None: epoch 0's), counting into this dataset's
        counters."""
        section, mixture = self.section, mixture or self.mixtures.at(0)
        seed = section.shuffle_seed or 0
        pair_format = self._pair_format()
        children = []
        for index, spec in enumerate(section.names):
            rules = CurateRules(filter=self.filter, filter_override=spec.filter, splits=frozenset(section.splits),
                                task_weights=mixture.task_weights, seed=seed, strict=section.on_bad_record == "fail",
                                pair_format=pair_format)
            children.append(CuratedSource(self._open(index), rules, self.counters[index]))
        return Mixer(children, section.interleave_mode, section.stopping_strategy, mixture.weights, seed)

    def _pair_format(self) -> ChatFormat:
        return self.encoder.chat_format if self.section.chat_template else plain_pair

    def packer(self, *, epoch: int, rank: int, world_size: int, batch_size: int, seq_len: int,
               plan: Plan | None = None) -> Packer | CachedPacker:
        """One rank's epoch under its plan (None: the configured mixture throughout) as a stage chain ending in a
        packer."""
        section = self.section
        plan = plan or self.mixtures.plan(epoch)
        if self.layouts is not None:  # node-aware: rank r reads the r-th run of the layout's regions (rows/deal.py)
            offset, layout = (0, self.layouts.get(epoch, plan[0][1])) if len(plan) == 1 else \
                self.layouts.segment(epoch, plan, seq_len)
            cached = CachedPacker(self.layouts.store, layout, Deal(rank, world_size, batch_size, layout.virtual),
                                  seq_len=seq_len, pack=self.config.pack, completion_only=section.completion_only,
                                  pad_id=self.facts.pad_id, remainder=section.remainder, offset=offset)
            self._check_working_set(cached, epoch=epoch, rank=rank, world_size=world_size)
            return cached
        deal = Deal(rank, world_size, batch_size)
        blocks_order = BlockShuffle(self.mix(plan[0][1]), block_size=section.shuffle_block,
                                    block_chars=section.shuffle_block_chars, seed=section.shuffle_seed, epoch=epoch,
                                    plan=None if len(plan) == 1 else partial(_block_mix, plan))
        blocks = TokenizedBlocks(blocks_order, self.encoder, with_prompts=section.completion_only,
                                 on_encoded=self._record_lengths if epoch == 0 else _ignore,
                                 encode_pool=self.runtime.encode_pool, read_pool=self.runtime.read_pool,
                                 shared=self.shared_reads.cache(world_size, block_chars=section.shuffle_block_chars,
                                                                mixture=plan))
        return Packer(TokenStream(blocks), deal, seq_len=seq_len, pack=self.config.pack,
                      completion_only=section.completion_only, pad_id=self.facts.pad_id, remainder=section.remainder)

    def _check_working_set(self, packer: CachedPacker, *, epoch: int, rank: int, world_size: int) -> None:
        """A remote store: the working set of the ranks of this world size with this epoch open here (this one
        included), kept for GetStats. When the shard cache is smaller, a warning once the ranks have stopped
        opening for WARN_AFTER_S (a sidecar's ranks open one by one), once per epoch and set of ranks."""
        store, cache = packer.store, packer.store.shards.cache
        if cache is None:
            return
        with self._working_lock:
            self._open_epochs[packer] = (epoch, world_size, rank)
            ranks = tuple(sorted({r for e, w, r in self._open_epochs.values() if (e, w) == (epoch, world_size)}))
            key = (epoch, world_size, ranks)
            needs = self._working_sets.get(key)
            self._opened += 1
            opened = self._opened  # a check that saw more ranks open may finish first: the later one wins
        if needs is None:
            shard_bytes = np.array([s.tokens_file.size for s in store.manifest.shards], dtype=np.int64)
            needs = working_set(packer.layout, store.shard, shard_bytes, world_size=world_size, ranks=ranks,
                                pack=self.config.pack)
        report = RanksWorkingSet(epoch, world_size, ranks, needs, cache.max_bytes)
        with self._working_lock:
            self._working_sets[key] = needs
            while len(self._working_sets) > WORKING_SETS_KEPT:
                self._working_sets.popitem(last=False)
            if opened > self._reported:
                self.working_set, self._reported = report, opened
            if opened > self._latest.get((epoch, world_size), (0, report))[0]:
                self._latest[epoch, world_size] = (opened, report)
            for old in [k for k in self._latest if k[0] < epoch - 2]:  # epochs long over: forget them
                del self._latest[old]
            self._warned = {k for k in self._warned if k[0] >= epoch - 2}
            report = self._latest[epoch, world_size][1]
            if report.fits or (epoch, world_size, report.ranks) in self._warned:
                return
            pending = self._pending.pop((epoch, world_size), None)
            if pending is not None:
                pending.cancel()
            timer = self._pending[epoch, world_size] = threading.Timer(
                WARN_AFTER_S, self._warn, args=(epoch, world_size, packer.layout.virtual, str(cache.dir)))
            timer.daemon = True
            timer.start()

    def _warn(self, epoch: int, world_size: int, virtual: int, cache_dir: str) -> None:
        """Warn that the ranks of this epoch and world size that opened last read more at once than the shard cache
        holds (unless said already for the same ranks)."""
        with self._working_lock:
            self._pending.pop((epoch, world_size), None)
            report = self._latest.get((epoch, world_size), (0, None))[1]
            if report is None or report.fits or (epoch, world_size, report.ranks) in self._warned:
                return
            self._warned.add((epoch, world_size, report.ranks))
        needs = report.needs
        other = (f"; or, for a new run, virtual_ranks (now {virtual}) a multiple of the world size {world_size}: each "
                 "rank then reads only its own virtual ranks" if virtual % world_size else "")
        log.warning("dataset %s, epoch %d: ranks %s of %d read up to %s of shards at once (%d shards, %s in the "
                    "epoch), but the shard cache %s holds %s (dataset.shard_cache_gb: %g): it will fetch again shards "
                    "it evicted, many times over, instead of each once (fix: set dataset.shard_cache_gb to at least "
                    "%g%s)", self.name, epoch, _ranges(report.ranks), world_size, _size(needs.peak_bytes),
                    needs.shards, _size(needs.epoch_bytes), cache_dir, _size(report.budget), report.budget / 1e9,
                    _gb_up(needs.peak_bytes * CACHE_HEADROOM), other)

    def _record_lengths(self, samples: list[Sample], encoded: EncodedBatch) -> None:
        sources = np.fromiter((s.source for s in samples), dtype=np.int64, count=len(samples))
        lengths = encoded.lengths
        for source in np.unique(sources):
            self.counters[source].add_lengths(lengths[sources == source])


def open_datasets(config: FeedConfig, runtime: Runtime) -> dict[str, ServedDataset]:
    """Open every configured dataset (tokenizers shared) on `runtime`; raises ConfigError/SourceError on bad
    input."""
    encoders: dict[tuple[str, str], Encoder] = {}
    datasets = {}
    for name, dataset_config in config.datasets.items():
        key = (dataset_config.tokenizer, dataset_config.dataset.tokenizer_backend)
        dataset = ServedDataset(dataset_config, config.file, encoders.get(key), runtime=runtime)
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


def _block_mix(plan: Plan, block: int) -> Mix:
    """The mixture in force at shuffle block `block`, as the mix takes it."""
    mixture = plan_at(plan, block)
    return mixture.weights, mixture.task_weights


def _served_sequence(store: TokenStore, specs: list[str], section: DatasetSection, mixture: Mixture,
                     served: np.ndarray | None) -> np.ndarray:
    """The store's served sequence under `mixture`, less `served` (cached/layout.served_sequence)."""
    return served_sequence(store, sources=len(specs), mode=section.interleave_mode, stopping=section.stopping_strategy,
                           weights=mixture.weights, task_weights=mixture.task_weights, seed=section.shuffle_seed or 0,
                           served=served)


def _ranges(values: tuple[int, ...]) -> str:
    """Sorted integers as runs: 0-3,6."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def _gb_up(size: float) -> float:
    """Bytes as GB (10^9), rounded up to two significant digits."""
    gb = size / 1e9
    if gb <= 0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(gb)) - 1)
    return round(math.ceil(gb / unit - 1e-9) * unit, 12)


def _size(size: int) -> str:
    """Bytes for people: 1.5 GB, 230 MB, 12 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def _fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
