"""Build a token store in this process: one shard per part of a source file (at most `shard_records` raw
records each), curated and tokenized on all cores.

Shards are written where the store lives (each file whole or not at all, see fs.py), skipped when a rerun
finds them complete and valid, and committed by the manifest, written last. Reading and curating the next
chunk (Python) overlaps with encoding the current one (Rust, no GIL).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..pipeline.accounting import SourceCounters, merge_accounting
from ..pipeline.curate import CuratedSource, CurateRules
from ..pipeline.samples import Sample
from ..pipeline.sources.base import RawRecord, Source, SourceState
from ..pipeline.stage import Stage
from ..pipeline.tokenize import EncodedBatch, Encoder
from ..progress import PartMeter, Progress
from ..store.format import (
    InputFile,
    Manifest,
    ShardFacts,
    ShardRows,
    ids_dtype,
    manifest_format,
    read_shard_facts,
    shard_complete,
    shard_name,
    write_manifest,
    write_shard,
)
from ..store.fs import StoreFS
from ..store.owner import new_owner
from .reuse import Donor, adopt_shard, donor_shards

log = logging.getLogger(__name__)

BUILD_CHUNK = 512  # small enough that reading the next chunk overlaps encoding even on small corpora
LEGACY_FILES = ("tokens.bin", "samples.parquet")  # a format-1 store's data files, removed once format 2 commits


@dataclass
class BuildProgress:
    """What GetStats shows while a store is being built."""

    state: str = "pending"  # pending, waiting (for another builder), building, retrying, ready, failed
    samples: int = 0
    tokens: int = 0
    error: str = ""


@dataclass(frozen=True)
class SourcePlan:
    """One source as the builder reads it: its spec, its files (cut into parts of at most `shard_records` raw
    records, one shard each), a fresh reader, its rules."""

    spec: str
    files: list[str]
    open: Callable[[], Source]
    rules: CurateRules  # without task weights: copies are a serve-time decision
    shard_records: int  # raw records per part (the dataset setting)
    identities: list[object] = field(default_factory=list)  # each file's content identity, as the membership took it
    shard_key: str = ""  # what names its shards beside their input: the sample settings (default: the store's)


@dataclass(frozen=True)
class Part:
    """One shard's input: the raw records of rows [start["row"], end) of one file (end None: to its end)."""

    source: int
    file: int
    part: int
    start: SourceState  # the source's state at the part's first row (`set_state` seeks there)
    end: int | None
    name: str


def source_parts(index: int, plan: SourcePlan, source: Source, fingerprint: str) -> list[Part]:
    """A source's parts in store order (file, then part). A shard's name derives from `plan.shard_key` (else the
    store's fingerprint), the source's index and its file's content identity (with how many files before it in the
    source have the same content), never its path or index: data that moved keeps its shards, and a store of more
    files takes the shards of those it shares with another store (reuse.py). A file of one part keeps the name of a
    whole-file shard; the names of a file cut in several parts include `shard_records`, so a rerun with another
    size never mistakes one part for another. The identities are the plan's (the epoch's membership took them; a
    plan without them asks the source)."""
    parts = []
    seen: dict[str, int] = {}
    for file, content in enumerate(plan.identities or source.file_identities()):
        key = json.dumps(content, default=str)
        same = seen[key] = seen.get(key, -1) + 1
        starts = source.part_starts(file, plan.shard_records)
        identity = [content, same] if len(starts) == 1 else [content, same, plan.shard_records]
        for k, start in enumerate(starts):
            end = starts[k + 1].row if k + 1 < len(starts) else None
            parts.append(Part(index, file, k, start, end, shard_name(plan.shard_key or fingerprint, index, identity,
                                                                     k)))
    return parts


class PartRecords(Stage[RawRecord, SourceState]):
    """A source's raw records of one part: ends where the next part or file begins."""

    def __init__(self, source: Source, part: Part) -> None:
        self.source, self.file, self.end = source, part.file, part.end
        source.set_state(part.start)

    def __next__(self) -> RawRecord:
        record = next(self.source)
        if record.file != self.file or (self.end is not None and record.row >= self.end):
            raise StopIteration
        return record

    def get_state(self) -> SourceState:
        """The source's position."""
        return self.source.get_state()

    def set_state(self, state: SourceState) -> None:
        """Continue at a position of the source (within the part)."""
        self.source.set_state(state)


def _chunks(samples: Iterator[Sample]) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == BUILD_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def shard_rows(samples: list[Sample], encoded: EncodedBatch) -> ShardRows:
    """A run of a shard's samples from the samples and their encoding."""
    return ShardRows.of(ids=encoded.ids, lengths=encoded.lengths, masked=encoded.masked,
                        file=np.fromiter((s.file for s in samples), np.int32, len(samples)),
                        row=np.fromiter((s.row for s in samples), np.int64, len(samples)),
                        task_type=[s.task_type for s in samples])


def complete_shard(fs: StoreFS, store: str, name: str, dtype: np.dtype) -> ShardFacts | None:
    """The facts of a shard an earlier run completed (files there, checksums good, same dtype), else None."""
    done = read_shard_facts(fs, store, name)
    if done is not None and done.dtype == dtype.str and shard_complete(fs, store, done):
        return done
    return None


def store_inputs(plans: list[SourcePlan]) -> list[list[InputFile]] | None:
    """Per source, its files' paths and content identities (None if a plan does not know its identities)."""
    if any(len(plan.identities) != len(plan.files) for plan in plans):
        return None
    return [[InputFile(path=path, identity=list(identity) if isinstance(identity, list) else [identity])
             for path, identity in zip(plan.files, plan.identities, strict=True)] for plan in plans]


def commit(fs: StoreFS, store: str, fingerprint: str, plans: list[SourcePlan], shards: list[ShardFacts],
           encoder: Encoder, *, dataset: str, engine: str) -> Manifest:
    """Write the manifest of every shard in store order (the commit point), then drop a format-1 store's files."""
    manifest = Manifest(
        format=manifest_format(shards), fingerprint=fingerprint,
        dtype=ids_dtype(encoder.vocab_size).str,  # type: ignore[arg-type]
        samples=sum(s.samples for s in shards), tokens=sum(s.tokens for s in shards), created=time.time(),
        dataset=dataset, shards=shards,
        sources=[merge_accounting(plan.spec, [s for s in shards if s.source == i]) for i, plan in enumerate(plans)],
        tokenizer_fingerprint=encoder.fingerprint, tokenizer_backend=encoder.backend_name,  # type: ignore[arg-type]
        token_facts=encoder.facts(), engine=engine, built_by=new_owner().label,
        inputs=store_inputs(plans))
    write_manifest(fs, store, manifest)
    for name in LEGACY_FILES:
        fs.delete(f"{store}/{name}")
    return manifest


class LocalBuilder:
    """Writes one store's shards and manifest from the sources' plans."""

    def __init__(self, fs: StoreFS, store: str, fingerprint: str, encoder: Encoder, *, with_prompts: bool,
                 progress: BuildProgress, show_bar: bool = True) -> None:
        self.fs, self.store, self.fingerprint, self.encoder = fs, store, fingerprint, encoder
        self.with_prompts, self.progress = with_prompts, progress
        self.dtype = ids_dtype(encoder.vocab_size)
        self.show_bar = show_bar
        self.written = self.skipped = self.reused = 0  # skipped: complete already or reused (of them: reused)
        self.donors: dict[str, Donor] = {}  # shards of the dataset's other stores, by name

    def _rows(self, samples: list[Sample], encoded: EncodedBatch, counters: SourceCounters) -> ShardRows:
        counters.add_lengths(encoded.lengths)
        self.progress.samples += len(samples)
        self.progress.tokens += len(encoded.ids)
        return shard_rows(samples, encoded)

    def _encoded(self, samples: Iterator[Sample], counters: SourceCounters, pool: ThreadPoolExecutor
                 ) -> Iterator[ShardRows]:
        pending: tuple[list[Sample], Future[EncodedBatch]] | None = None
        for chunk in _chunks(samples):
            future = pool.submit(self.encoder.encode, chunk, self.with_prompts)
            if pending is not None:
                yield self._rows(pending[0], pending[1].result(), counters)
            pending = (chunk, future)
        if pending is not None:
            yield self._rows(pending[0], pending[1].result(), counters)

    def shard(self, plan: SourcePlan, source: Source, part: Part, pool: ThreadPoolExecutor) -> ShardFacts:
        """One part's shard: the complete one already there (not read again), or a new one."""
        done = complete_shard(self.fs, self.store, part.name, self.dtype)
        if done is None and part.name in self.donors and self.donors[part.name].facts.dtype == self.dtype.str:
            done = adopt_shard(self.fs, self.store, self.donors[part.name], source=part.source, file=part.file)
            self.reused += done is not None
        if done is not None:
            self.skipped += 1
            self.progress.samples += done.samples
            self.progress.tokens += done.tokens
            return done
        counters = SourceCounters(plan.spec)
        curated = CuratedSource(PartRecords(source, part), plan.rules, counters)  # type: ignore[arg-type]
        facts = write_shard(self.fs, self.store, part.name, self._encoded(curated, counters, pool), source=part.source,
                            dtype=self.dtype, accounting=counters.snapshot)
        self.written += 1
        return facts

    def build(self, plans: list[SourcePlan], dataset: str, check: Callable[[], None] = lambda: None) -> Manifest:
        """Every shard (skipping complete ones), then the manifest: the commit point. `check` runs before each
        shard and before the commit, and raises to stop (a build lease that was taken over)."""
        self.progress.state = "building"
        started = time.monotonic()
        self.donors = donor_shards(self.fs, self.store, dataset)
        shards = []
        meter = PartMeter(f for plan in plans for f in plan.files)
        with Progress(f"dataset {dataset}: tokenizing into {self.fs.uri(self.store)}", label=f"tokenizing {dataset}",
                      total=meter.total, unit=meter.unit, enabled=self.show_bar) as report, \
                ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
            for i, plan in enumerate(plans):
                source = plan.open()
                parts = source_parts(i, plan, source, self.fingerprint)
                for part, share in zip(parts, meter.shares(plan.files, [p.file for p in parts]), strict=True):
                    check()
                    shards.append(self.shard(plan, source, part, pool))
                    report.advance(share)
        check()
        manifest = commit(self.fs, self.store, self.fingerprint, plans, shards, self.encoder, dataset=dataset,
                          engine="local")
        log.info("token store ready: %s (%d samples, %d tokens, %d shards: %d written, %d complete from before, "
                 "%d taken from the dataset's other stores; %.1f s)", self.fs.uri(self.store), manifest.samples,
                 manifest.tokens, len(shards), self.written, self.skipped - self.reused, self.reused,
                 time.monotonic() - started)
        return manifest


class StoreBuilder(Protocol):
    """A build engine's entry point (`build_store` here, build_ray's on a Ray cluster)."""

    def __call__(self, plans: list[SourcePlan], encoder: Encoder, *, fs: StoreFS, store: str, fingerprint: str,
                 dataset: str, with_prompts: bool, progress: BuildProgress, show_bar: bool = True,
                 check: Callable[[], None] = ...) -> Manifest: ...


def build_store(plans: list[SourcePlan], encoder: Encoder, *, fs: StoreFS, store: str, fingerprint: str,
                dataset: str, with_prompts: bool, progress: BuildProgress, show_bar: bool = True,
                check: Callable[[], None] = lambda: None) -> Manifest:
    """Build (or finish) the store at `store` and commit it; returns its manifest. `check` runs before each
    shard and before the commit (a build lease's `check`)."""
    builder = LocalBuilder(fs, store, fingerprint, encoder, with_prompts=with_prompts, progress=progress,
                           show_bar=show_bar)
    return builder.build(plans, dataset, check)

