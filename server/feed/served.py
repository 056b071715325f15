"""A served dataset: its config, tokenizer, fingerprints and counters, and which stage chain each rank reads."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import count, islice
from pathlib import Path
from typing import Any

import numpy as np

from ..builders.lifecycle import StoreLifecycle
from ..builders.local_engine import BuildProgress, SourcePlan, StoreBuilder, build_store
from ..cached.layout import served_sequence, virtual_ranks
from ..cached.layouts import EpochLayouts
from ..cached.packer import CachedPacker
from ..cached.working_set import WorkingSet, cache_gb_to_fit, rank_ranges, working_set
from ..config import DatasetConfig, DatasetSection, FeedConfig, SourceSpec
from ..errors import Refused, SourceError, Unavailable
from ..observe.throughput import Throughput
from ..paths import cache_home
from ..pipeline.accounting import SourceCounters
from ..pipeline.chat import MessagesFormat
from ..pipeline.curate import CuratedSource, CurateRules
from ..pipeline.filters import make_filter
from ..pipeline.mixing import Mixer
from ..pipeline.samples import ChatFormat, Sample, normalise, plain_pair
from ..pipeline.sources.base import Source
from ..pipeline.sources.opening import open_source
from ..pipeline.tokenize import EncodedBatch, Encoder
from ..rows.deal import Deal
from ..runtime import Runtime
from ..store.format import MANIFEST, StoreDamaged, TokenFacts, store_dir
from ..store.fs import StoreFS, is_uri, resolve
from ..store.reader import TokenStore, open_store
from ..store.shard_cache import ShardCache
from ..streaming.block_mixtures import BlockMixtures, BlockPlan
from ..streaming.block_order import BlockShuffle, Mix
from ..streaming.encoding import TokenizedBlocks, TokenStream
from ..streaming.packer import Packer
from ..streaming.shared_reads import SharedReads
from .membership import Membership, Memberships
from .mixtures import Mixture, Mixtures, Plan
from .run_members import dataset_key, localize, run_members
from .source_names import names_of
from .union import StreamUnion, active_of

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
        self.names = names_of(self.section.names)  # the source list as a streaming cursor carries it
        probes = [self._opener(i, None)() for i in range(len(self.specs))]  # fails fast on missing sources
        self.mixtures = Mixtures(self.section, self.specs, config_file)
        self.filter = make_filter(self.section)
        self.counters = [SourceCounters(spec) for spec in self.specs]
        self.throughput = Throughput()
        self.shared_reads = SharedReads()  # streaming: the ranks of a layout share each block's read
        # the store's fingerprint: the sample settings, the tokenizer and the sources' content (an epoch's membership)
        first = self._membership([list(p.files) for p in probes], [p.file_identities() for p in probes])
        # the cursors': the order's settings and the sample settings, not the sources' content, which each epoch fixes
        # at its start (its membership, in the cursor): data that grows keeps every cursor; nor the source list, which
        # may change at any resume (inside an epoch: source_change.py, cached; stream_sources.py, streaming)
        samples = _fingerprint(_without_paths(self.section, tuple(s for s in CONTENT_SETTINGS if s != "names")),
                               self.encoder.fingerprint)
        self.fingerprint = _fingerprint(_without_paths(self.section, ORDER_SETTINGS),
                                        self.config.pack, samples, ORDER_REVISION)
        self.sources = _fingerprint(_without_paths(self.section, ("names",)))  # kinds and filter overrides
        fs = resolve(self.section.cache_dir or cache_home())
        runs = run_members(fs, dataset=self.name, key=dataset_key(self.name, self.fingerprint, self.sources),
                           sources=len(self.specs), make=self._membership)  # a job's sidecars agree on epochs' files
        self.memberships = Memberships(first, look=self._look, adopt=self._adopt, dataset=self.name, runs=runs,
                                       localize=self._localize)
        self.lifecycle = self._lifecycle(fs, self.memberships.current)
        self.layouts: EpochLayouts | None = None  # cached mode, once the store is open: the current membership's
        self._members: dict[str, EpochLayouts] = {}  # every membership's layouts opened here (members_layouts)
        self._members_lock = threading.Lock()
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
            self.encoder.choose_backend(_first_samples(probes, self._pair_format(), self.encoder.format_messages),
                                        chat=self.section.chat_template)
        if not self.cached:
            self.lifecycle.progress.state = "ready"
            self.lifecycle.ready.set()

    @property
    def content_fingerprint(self) -> str:
        """The current membership's content fingerprint: its token store's name."""
        return self.memberships.current.fingerprint

    @property
    def files(self) -> list[list[str]]:
        """The current membership's files, per source."""
        return self.memberships.current.files

    @property
    def store_dir(self) -> str:
        """The current membership's token store folder."""
        return self.lifecycle.store_dir

    def _lifecycle(self, fs: StoreFS, members: Membership) -> StoreLifecycle:
        return StoreLifecycle(self.name, fs, store_dir(fs, members.fingerprint), members.fingerprint,
                              encoder=self.encoder, plans=self._plans(members),
                              with_prompts=self.section.completion_only, shard_cache=self._shard_cache)

    def _membership(self, files: list[list[str]], identities: list[list[object]]) -> Membership:
        """Files and their identities as a membership, named by the content fingerprint of their token store."""
        fingerprint = _fingerprint(_without_paths(self.section, CONTENT_SETTINGS), identities,
                                   self.encoder.fingerprint)
        return Membership(fingerprint, files, identities)

    def membership_now(self, specs: list[SourceSpec], within: Membership | None = None) -> Membership:
        """A membership over another source list than `names` (streaming, stream_sources.py): their files as they
        are now (`within`: taken from a membership over a list that begins with these sources)."""
        if within is None:
            opened = [self._opener(index, None, spec=spec.name)() for index, spec in enumerate(specs)]
            files, identities = [list(s.files) for s in opened], [s.file_identities() for s in opened]
        else:
            files, identities = within.files[:len(specs)], within.identities[:len(specs)]
        section = self.section.model_copy(update={"names": specs})
        return Membership(_fingerprint(_without_paths(section, CONTENT_SETTINGS), identities,
                                       self.encoder.fingerprint), files, identities)

    def _look(self) -> Membership:
        """What the sources hold now: local and Parquet sources' paths expanded again and their files' identities
        taken (a Hub source, or one whose path names nothing now, keeps its files)."""
        current = self.memberships.current
        files, identities = list(current.files), list(current.identities)
        for index, spec in enumerate(self.specs):
            if _source_kind(spec) not in ("local", "parquet"):
                continue
            try:
                source = self._opener(index, None)()
            except SourceError as err:
                log.warning("dataset %s: %s; the source keeps the files it had", self.name, err)
                continue
            files[index], identities[index] = list(source.files), source.file_identities()
        return self._membership(files, identities)

    def _localize(self, recorded: Membership) -> Membership:
        """A membership a run's other sidecar recorded, over the paths of its files here; Unavailable while a file of
        it is not here, unless (cached mode) its store is committed, which serves without the files."""
        members, missing = localize(recorded, self._look())
        fs = self.lifecycle.fs
        if missing and not (self.cached and fs.exists(f"{store_dir(fs, members.fingerprint)}/{MANIFEST}")):
            raise Unavailable(f"dataset {self.name}: the run's record fixes the epoch's files (content "
                              f"{members.fingerprint}), and this sidecar does not see {len(missing)} of them (first: "
                              f"{missing[0]}); retrying until they appear (a run id reused from another run: use a "
                              "new one)")
        return members

    def _adopt(self, members: Membership) -> None:
        """Ready a new membership to serve: cached mode, its token store opened, or built (only its new shards)."""
        if self.cached:
            lifecycle = self._lifecycle(self.lifecycle.fs, members)
            lifecycle.prepare(self._serve_store, show_bar=False)
            self.lifecycle = lifecycle
            keep = self.memberships.recent() | {members.fingerprint}
            with self._members_lock:  # memberships no recent epoch serves: opened again if a cursor asks
                self._members = {fingerprint: layouts for fingerprint, layouts in self._members.items()
                                 if fingerprint in keep}

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
        return Path(configured).expanduser() if configured else cache_home() / "shards"

    def _shard_cache(self) -> ShardCache:
        return self.runtime.shard_cache(self.shard_cache_dir, int(self.section.shard_cache_gb * 1e9),
                                        any_slot=self.section.shard_cache_dir is None)

    def _opener(self, index: int, files: list[str] | None,
                identities: list[object] | None = None, spec: str | None = None) -> Callable[[], Source]:
        """A picklable function that opens source `index` afresh (a build engine may call it elsewhere), over the
        files of a membership (None: those its path names now), with their identities if given (the membership's:
        not taken again): a file deleted or added since is no reason for the others to change their index (a
        deleted one reads as a bad file, counted). `spec`: a source not in `names` (stream_sources.py)."""
        hf_cache = self.section.cache_dir if self.section.cache_dir and not is_uri(self.section.cache_dir) else None
        return partial(open_source, spec or self.specs[index], index, base_dir=self.config.base_dir, cache_dir=hf_cache,
                       files=files, identities=identities)

    def prepare(self, *, show_bar: bool = True, serve: bool = True, build: StoreBuilder = build_store) -> None:
        """Cached mode: open (or build, or wait for) the token store, then lay out its served sequence."""
        if self.cached:
            self.lifecycle.prepare(self._serve_store, show_bar=show_bar, serve=serve, build=build)

    def _serve_store(self, store: TokenStore) -> None:
        """The store's accounting becomes the counters; its samples, mixed, the sequence epochs lay out."""
        self.counters = [SourceCounters.restore({**s.model_dump(), "spec": spec})  # data that moved: its spec now
                         for s, spec in zip(store.manifest.sources, self.specs, strict=True)]
        layouts = self._layouts(store)
        with self._members_lock:
            self._members[store.manifest.fingerprint] = layouts
        self.layouts = layouts

    def _layouts(self, store: TokenStore, virtual: int | None = None) -> EpochLayouts:
        """The epoch layouts of a store's samples, mixed (over `virtual` virtual ranks; None: from the config). A store
        of another source list (an epoch begun, or continued, before a source was added or removed) serves only the
        epoch it was resumed in: no later epoch is laid out over it."""
        section = self.section
        sequences = partial(_served_sequence, store, section)
        own = len(store.manifest.sources) == len(self.specs)
        if virtual is None:  # V is fixed by epoch 0's mixture, for the run's life
            virtual = virtual_ranks(section.virtual_ranks, len(sequences(self.mixtures.at(0), None)) if own else 0)
        return EpochLayouts(store, sequences, self.mixtures.at, virtual=virtual, seed=section.shuffle_seed,
                            window_shards=section.shuffle_window_shards, pack=self.config.pack,
                            epochs=section.epochs if own else 0, pool=self.runtime.layout_pool)

    def members_layouts(self, members: str, virtual: int | None = None) -> EpochLayouts:
        """The epoch layouts of an epoch that began over another membership of the sources' files (files added or
        changed since, or another source list), over `virtual` virtual ranks (None: the config's): the store of that
        membership, which must still be in the cache folder, else Refused."""
        with self._members_lock:
            layouts = self._members.get(members)
            if layouts is None:
                fs = self.lifecycle.fs
                cache = self._shard_cache() if not fs.is_local else None
                try:
                    store = open_store(fs, store_dir(fs, members), members, shard_cache=cache, verify=False)
                except StoreDamaged as err:
                    raise Refused(f"cursor: its epoch began over the sources' files as they were then (token store "
                                  f"{members}), which changed since, and that store cannot be opened ({err}): "
                                  "resume from the epoch's end, or restore that store in the cache folder") from None
                log.info("dataset %s: serving an epoch begun over an earlier membership of the sources' files from "
                         "its token store %s", self.name, store.location)
                layouts = self._members[members] = self._layouts(store, virtual)
            elif virtual is not None and layouts.virtual != virtual:
                layouts = self._members[members] = self._layouts(layouts.store, virtual)
            return layouts

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

    def _plans(self, members: Membership) -> Callable[[], list[SourcePlan]]:
        """The build plans of a membership for each build attempt: the first over its files' identities as its
        listing took them (not taken again); a retry (after RemoteChanged: an object replaced since) takes them anew,
        so its shards are named by what they hold."""
        attempts = count()
        return lambda: self._source_plans(members, fresh=next(attempts) > 0)

    def _source_plans(self, members: Membership, *, fresh: bool) -> list[SourcePlan]:
        """What the store builder reads: every source over a membership's files with its rules, task weights left to
        serve time, and their identities (`fresh`: taken anew)."""
        plans = []
        for index, spec in enumerate(self.section.names):
            rules = CurateRules(filter=self.filter, filter_override=spec.filter, splits=frozenset(self.section.splits),
                                task_weights=None, seed=0, strict=self.section.on_bad_record == "fail",
                                pair_format=self._pair_format(), messages_format=self.encoder.format_messages)
            files = members.files[index]
            identities = self._opener(index, files)().file_identities() if fresh else members.identities[index]
            plans.append(SourcePlan(spec.name, list(files), self._opener(index, files, identities), rules,
                                    self.section.shard_records, identities, self._shard_key(index)))
        return plans

    def _shard_key(self, index: int) -> str:
        """What names a source's shards beside their input (local_engine.source_parts): the settings that decide its
        samples and tokens, not the other sources nor the store's membership, so a store of more data takes the
        shards it shares with the dataset's other stores."""
        settings = _without_paths(self.section, CONTENT_SETTINGS)
        settings["names"] = settings["names"][index]
        return _fingerprint(settings, self.encoder.fingerprint)

    def mix(self, files: list[list[str]] | None = None, mixture: Mixture | None = None,
            specs: list[SourceSpec] | None = None) -> Mixer:
        """A fresh chain sources -> curate -> mix over a membership's files (None: the current one's) under `mixture`
        (None: epoch 0's), counting into this dataset's counters; `specs`: over these sources (streaming, a source
        list changed inside the epoch: stream_sources.py; a source not in `names` is counted apart)."""
        files = files or self.files
        section, mixture = self.section, mixture or self.mixtures.at(0)
        seed = section.shuffle_seed or 0
        pair_format = self._pair_format()
        children = []
        for index, spec in enumerate(specs or section.names):
            own = section.names.index(spec) if spec in section.names else len(self.specs) + index
            rules = CurateRules(filter=self.filter, filter_override=spec.filter, splits=frozenset(section.splits),
                                task_weights=mixture.task_weights, seed=seed, strict=section.on_bad_record == "fail",
                                pair_format=pair_format, messages_format=self.encoder.format_messages)
            counters = self.counters[own] if own < len(self.specs) else SourceCounters(spec.name)
            children.append(CuratedSource(self._opener(own, files[index], spec=spec.name)(), rules, counters))
        return Mixer(children, section.interleave_mode, section.stopping_strategy, mixture.weights, seed,
                     active_of(mixture), widen=specs is not None)

    def _pair_format(self) -> ChatFormat:
        return self.encoder.chat_format if self.section.chat_template else plain_pair

    def packer(self, *, epoch: int, rank: int, world_size: int, batch_size: int, seq_len: int,
               members: str | None = None, plan: Plan | BlockPlan[Mixture] | None = None,
               virtual: int | None = None, union: StreamUnion | None = None) -> Packer | CachedPacker:
        """One rank's epoch as a stage chain ending in a packer, over the sources' files of `members` (the epoch's
        membership, from its cursor; None: the one fixed for the epoch here, see membership.py) and under `plan` (the
        epoch's mixtures by row; a resumed streaming epoch's by block and row; None: the configured ones). Cached
        mode: `virtual`, the epoch's virtual ranks when its cursor names them (None: the config's); a mixture of the
        plan over another membership (a source list changed inside the epoch) is laid out over that membership's
        store. Streaming mode: `union`, the sources of an epoch whose source list changed inside it
        (stream_sources.py)."""
        section = self.section
        members = members or self.memberships.of_epoch(epoch).fingerprint
        plan = plan or self.mixtures.plan(epoch)
        if isinstance(plan, BlockPlan):
            assert self.layouts is None, "a plan by shuffle block in cached mode"
            return self._stream_packer(epoch, rank, world_size, batch_size, seq_len, members, plan, union)
        if self.layouts is not None:  # node-aware: rank r reads the r-th run of the layout's regions (rows/deal.py)
            layouts = self.members_layouts(members, virtual)
            other = partial(self._mixture_layouts, members) if any(m.members for _, m in plan) else None
            (_, layout, _), *later = [(0, layouts.get(epoch, plan[0][1]), layouts.store)] if len(plan) == 1 else \
                layouts.segments(epoch, plan, seq_len, other)
            cached = CachedPacker(layouts.store, layout, Deal(rank, world_size, batch_size, layout.virtual),
                                  seq_len=seq_len, pack=self.config.pack, completion_only=section.completion_only,
                                  pad_id=self.facts.pad_id, remainder=section.remainder, later=later)
            self._check_working_set(cached, epoch=epoch, rank=rank, world_size=world_size)
            return cached
        unit = seq_len if self.config.pack else 1
        return self._stream_packer(epoch, rank, world_size, batch_size, seq_len, members,
                                   BlockPlan((), 0, plan, unit, self.config.pack), union)

    def _stream_packer(self, epoch: int, rank: int, world_size: int, batch_size: int, seq_len: int, members: str,
                       plan: BlockPlan[Mixture], union: StreamUnion | None = None) -> Packer:
        """One rank's streaming epoch over `members`' files (or `union`'s sources), each shuffle block under its
        mixture of `plan` (streaming/block_mixtures.py)."""
        section = self.section
        membership = union.membership if union is not None else self.memberships.of(members)
        if membership is None:
            raise Refused("cursor: its epoch began over the sources' files as they were then, which changed since; "
                          "streaming mode reads the files as they are, so resume from the epoch's end (a cursor "
                          "taken at an epoch end), or restore the files")
        deal = Deal(rank, world_size, batch_size)
        chosen = BlockMixtures(plan, _as_mix, partial(self.mixtures.took_effect, epoch))
        first = (plan.served or plan.rows)[0][1]
        one = all(mixture == first for _, mixture in (*plan.served, *plan.rows))
        blocks_order = BlockShuffle(self.mix(membership.files, first, union.specs if union else None),
                                    block_size=section.shuffle_block,
                                    block_chars=section.shuffle_block_chars, seed=section.shuffle_seed, epoch=epoch,
                                    plan=None if one else chosen.mix)
        blocks = TokenizedBlocks(blocks_order, self.encoder, with_prompts=section.completion_only,
                                 on_encoded=self._record_lengths if epoch == 0 else _ignore,
                                 encode_pool=self.runtime.encode_pool, read_pool=self.runtime.read_pool,
                                 shared=self.shared_reads.cache(world_size, block_chars=section.shuffle_block_chars,
                                                                mixture=plan), mixtures=chosen)
        return Packer(TokenStream(blocks), deal, seq_len=seq_len, pack=self.config.pack,
                      completion_only=section.completion_only, pad_id=self.facts.pad_id, remainder=section.remainder)

    def _mixture_layouts(self, members: str, mixture: Mixture) -> EpochLayouts:
        """The layouts of the store a mixture of an epoch begun over `members` is laid out over."""
        return self.members_layouts(mixture.members or members)

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
                    "%g%s)", self.name, epoch, rank_ranges(report.ranks), world_size, _size(needs.peak_bytes),
                    needs.shards, _size(needs.epoch_bytes), cache_dir, _size(report.budget), report.budget / 1e9,
                    cache_gb_to_fit(needs.peak_bytes), other)

    def _record_lengths(self, samples: list[Sample], encoded: EncodedBatch) -> None:
        sources = np.fromiter((s.source for s in samples), dtype=np.int64, count=len(samples))
        lengths = encoded.lengths
        present = np.unique(sources)
        for source in present[present < len(self.counters)]:  # (sources not in `names`: counted apart)
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


def _first_samples(sources: list[Source], pair_format: ChatFormat, messages_format: MessagesFormat) -> list[Sample]:
    """The first PROBE_RECORDS records of every source as samples (unfiltered, uncounted; bad ones left out)."""
    samples = []
    for source in sources:
        try:
            for record in islice(source, PROBE_RECORDS):
                sample = normalise(record, pair_format, messages_format)
                if not isinstance(sample, str):
                    samples.append(sample)
        except SourceError:
            continue  # reading it for real reports the error where it belongs
    return samples


def _without_paths(section: DatasetSection, settings: tuple[str, ...]) -> dict[str, Any]:
    """The settings as a fingerprint holds them, free of where local data lies (data that moves keeps its store and
    cursors): a source is its kind and filter override (its files' content is in the fingerprint beside)."""
    values = section.model_dump(mode="json", include=set(settings))
    if "names" in values:
        values["names"] = [[_source_kind(s.name), s.filter] for s in section.names]
    return values


def _source_kind(spec: str) -> str:
    """A source spec without a local path: `local`, `parquet`, or the spec itself (a Hub dataset is its name)."""
    prefix, colon, _ = spec.partition(":")
    return prefix if colon and prefix in ("local", "parquet") else spec


def _as_mix(mixture: Mixture) -> Mix:
    """A mixture as the mix takes it."""
    return mixture.weights, mixture.task_weights, active_of(mixture)


def _served_sequence(store: TokenStore, section: DatasetSection, mixture: Mixture,
                     served: np.ndarray | None) -> np.ndarray:
    """The store's served sequence under `mixture` (a weight per source of the store), less `served`
    (cached/layout.served_sequence); ValueError for a mixture of another number of sources."""
    if len(mixture.weights) != len(store.manifest.sources):
        raise ValueError(f"a mixture of {len(mixture.weights)} sources over a store of {len(store.manifest.sources)}")
    return served_sequence(store, sources=len(store.manifest.sources), mode=section.interleave_mode,
                           stopping=section.stopping_strategy,
                           weights=mixture.weights, task_weights=mixture.task_weights, seed=section.shuffle_seed or 0,
                           served=served)


def _size(size: int) -> str:
    """Bytes for people: 1.5 GB, 230 MB, 12 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def _fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
