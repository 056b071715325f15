"""Build a token store on a Ray cluster with Ray Data: the same shards and manifest as build_local.

One row per part of a source file (the unit of a shard, as local_engine.source_parts cuts the files) flows
through two stages: Ray tasks read and curate the part, or find its shard complete from an earlier run; then
a pool of actors, each with the driver's tokenizer and encode backend loaded once, encodes the samples and
writes the shard where the store lives.
Actors hold half a CPU each, so the pool never takes every CPU and starves the read tasks
(ray-project/ray#44687). The driver commits the manifest, last, once every shard is written.
Ray is imported only here and only when this engine runs: serving never needs it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ConfigError, FeedError
from ..pipeline.accounting import SourceCounters
from ..pipeline.curate import CuratedSource
from ..pipeline.samples import Sample
from ..pipeline.tokenize import Encoder
from ..progress import PartMeter, Progress
from ..store.format import Manifest, ShardFacts, ShardRows, ids_dtype, write_shard
from ..store.fs import StoreFS, resolve
from ..store.lease import LeaseLost
from .local_engine import (
    BUILD_CHUNK,
    BuildProgress,
    Part,
    PartRecords,
    SourcePlan,
    commit,
    complete_shard,
    shard_rows,
    source_parts,
)
from .reuse import adopt_shard, donor_shards

log = logging.getLogger(__name__)

ACTOR_CPUS = 0.5  # fractional: an actor pool holding every CPU starves the read tasks forever
SAMPLE_COLUMNS = {"text": pa.large_string(), "kind": pa.string(), "masked": pa.list_(pa.int64()),
                  "row": pa.int64(), "task_type": pa.string()}


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs to load the driver's tokenizer with the driver's encode backend."""

    path: str
    file: str | None
    backend: str  # `hf` or `fastokens`, as the driver chose
    fingerprint: str

    @classmethod
    def of(cls, encoder: Encoder) -> EncoderSpec:
        """The spec of an encoder whose backend is chosen."""
        return cls(str(encoder.path), encoder.file, encoder.backend_name, encoder.fingerprint)


@functools.lru_cache(maxsize=4)
def load_encoder(spec: EncoderSpec) -> Encoder:
    """The spec's encoder, loaded once per worker process; ConfigError if this node's tokenizer files differ."""
    encoder = Encoder(spec.path, file=spec.file, backend=spec.backend)
    if encoder.fingerprint != spec.fingerprint:
        raise ConfigError(f"tokenizer {spec.path} on this Ray node differs from the driver's (fingerprint "
                          f"{encoder.fingerprint}, expected {spec.fingerprint})", key="model_name", file=spec.file,
                          fix="give every Ray node the same tokenizer files")
    encoder.choose_backend()
    return encoder


@dataclass(frozen=True)
class ChatFormat:
    """The driver's chat template as a picklable pair format: the worker's own copy of the tokenizer applies it."""

    encoder: EncoderSpec

    def __call__(self, prompt: str, gen: str) -> tuple[str, int]:
        return load_encoder(self.encoder).chat_format(prompt, gen)


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, sent once: the plans, the encoder, where the store lives."""

    plans: list[SourcePlan]
    shards: list[Part]  # in store order
    encoder: EncoderSpec
    location: str  # the store root as every node resolves it
    store: str
    dtype: str
    with_prompts: bool

    def fs(self) -> StoreFS:
        """The store's filesystem, resolved on this node (credentials from its environment)."""
        return resolve(self.location)


def portable(plans: list[SourcePlan], encoder: Encoder) -> list[SourcePlan]:
    """The plans with the encoder's chat template for pairs and conversations (bound methods of a loaded tokenizer)
    made picklable."""
    spec = EncoderSpec.of(encoder)
    out = [replace(p, rules=replace(p.rules, pair_format=ChatFormat(spec)))
           if p.rules.pair_format == encoder.chat_format else p for p in plans]
    return [replace(p, rules=replace(p.rules, messages_format=encoder.render_messages))  # a template: picklable
            if p.rules.messages_format == encoder.format_messages else p for p in out]


def _read(batch: pa.Table, job: Job) -> pa.Table:
    """Ray task: each part's curated samples, or the facts of its shard if an earlier run completed it."""
    return pa.concat_tables([_read_part(item, job) for item in batch.column("item").to_pylist()])


def _read_part(item: int, job: Job) -> pa.Table:
    """One part's row: its curated samples and accounting, or its complete shard's facts."""
    part = job.shards[item]
    plan = job.plans[part.source]
    done = complete_shard(job.fs(), job.store, part.name, np.dtype(job.dtype))
    counters = SourceCounters(plan.spec)
    samples: list[Sample] = []
    if done is None:
        samples = list(CuratedSource(PartRecords(plan.open(), part), plan.rules, counters))  # type: ignore[arg-type]
    columns: dict[str, Any] = {
        "item": pa.array([item], pa.int64()),
        "done": pa.array([done.model_dump_json() if done else None], pa.large_string()),
        "accounting": pa.array([json.dumps(counters.snapshot())], pa.large_string()),
        **{key: pa.array([[getattr(s, key) for s in samples]], pa.large_list(kind))
           for key, kind in SAMPLE_COLUMNS.items()}}
    return pa.table(columns)


class ShardWriter:
    """Ray actor: encodes each part's samples and writes its shard; the tokenizer is loaded once per actor."""

    def __init__(self, job: Job) -> None:
        self.job, self.fs = job, job.fs()
        self.encoder = load_encoder(job.encoder)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        facts = [row["done"] or self._write(row) for row in rows]
        return pa.table({"item": batch.column("item"), "facts": pa.array(facts, pa.large_string()),
                         "written": pa.array([row["done"] is None for row in rows])})

    def _write(self, row: dict[str, Any]) -> str:
        part = self.job.shards[row["item"]]
        source = part.source
        counters = SourceCounters.restore(json.loads(row["accounting"]))
        samples = [Sample(source, part.file, r, text, kind, masked=tuple(m), task_type=t) for text, kind, m, r, t in
                   zip(*(row[key] for key in SAMPLE_COLUMNS), strict=True)]
        facts = write_shard(self.fs, self.job.store, part.name, self._chunks(samples, counters), source=source,
                            dtype=self.job.dtype, accounting=counters.snapshot)
        return facts.model_dump_json()

    def _chunks(self, samples: list[Sample], counters: SourceCounters) -> Iterator[ShardRows]:
        for start in range(0, len(samples), BUILD_CHUNK):
            chunk = samples[start:start + BUILD_CHUNK]
            encoded = self.encoder.encode(chunk, self.job.with_prompts)
            counters.add_lengths(encoded.lengths)
            yield shard_rows(chunk, encoded)


def _original(err: Exception) -> Exception:
    """What a worker raised, out of Ray's wrappers, if it is one the server maps (a bad record or config,
    an OSError it retries); else Ray's error."""
    from ray.exceptions import RayError

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, FeedError | OSError) and not isinstance(cause, RayError):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    return err


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def cluster(address: str | None = None) -> Iterator[None]:
    """Ray for the block: the running one if this process is connected, else a new local cluster bound to
    loopback on this machine's cores (address None) or the cluster at `address`; shut down afterwards."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray engine needs Ray: pip install 'sigil-feed[ray]'") from None
    if ray.is_initialized():
        yield
        return
    if address is None:
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=_cores(), include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
    else:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def build_store(plans: list[SourcePlan], encoder: Encoder, *, fs: StoreFS, store: str, fingerprint: str,
                dataset: str, with_prompts: bool, progress: BuildProgress, show_bar: bool = True,
                check: Callable[[], None] = lambda: None, address: str | None = None) -> Manifest:
    """Build (or finish) the store at `store` on Ray and commit it; returns its manifest (see build_local).
    `check` runs as each shard is done and before the commit, and raises to stop (a build lease taken over)."""
    import ray.data

    started = time.monotonic()
    shards = [part for i, plan in enumerate(plans) for part in source_parts(i, plan, plan.open(), fingerprint)]
    dtype = ids_dtype(encoder.vocab_size)
    donors = donor_shards(fs, store, dataset)  # data that grew: shards the dataset's other stores hold, taken here
    for part in shards:
        donor = donors.get(part.name)
        if donor is not None and donor.facts.dtype == dtype.str and complete_shard(fs, store, part.name, dtype) is None:
            adopt_shard(fs, store, donor, source=part.source, file=part.file)
    meter = PartMeter(f for plan in plans for f in plan.files)
    shares = [share for i, plan in enumerate(plans)
              for share in meter.shares(plan.files, [p.file for p in shards if p.source == i])]
    job = Job(portable(plans, encoder), shards, EncoderSpec.of(encoder), fs.root if fs.is_local else fs.location,
              store, dtype.str, with_prompts)
    progress.state = "building"
    found: dict[int, ShardFacts] = {}
    written = 0
    with cluster(address), Progress(f"dataset {dataset}: tokenizing on Ray into {fs.uri(store)}", enabled=show_bar,
                                    total=meter.total, unit=meter.unit, label=f"tokenizing {dataset}") as report:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # they would write into piped and JSON logs; `report` says it all
        context.raise_original_map_exception = True  # a worker's SourceError or OSError, not a UserCodeException
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        items = ray.data.from_items([{"item": i} for i in range(len(shards))],
                                    override_num_blocks=max(1, len(shards)))  # one read task per part
        read = items.map_batches(functools.partial(_read, job=job), batch_size=1, batch_format="pyarrow")
        shards_out = read.map_batches(ShardWriter, batch_size=1, batch_format="pyarrow",
                                      fn_constructor_kwargs={"job": job}, num_cpus=ACTOR_CPUS,
                                      compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus))
        try:
            for row in shards_out.iter_rows():
                check()
                facts = found[row["item"]] = ShardFacts.model_validate_json(row["facts"])
                written += row["written"]
                progress.samples += facts.samples
                progress.tokens += facts.tokens
                report.advance(shares[row["item"]])
        except LeaseLost:
            raise
        except Exception as err:
            raise _original(err) from None
    check()
    manifest = commit(fs, store, fingerprint, plans, [found[i] for i in range(len(shards))], encoder,
                      dataset=dataset, engine="ray")
    log.info("token store ready: %s (%d samples, %d tokens, %d shards on Ray: %d written, %d complete from before; "
             "%.1f s)", fs.uri(store), manifest.samples, manifest.tokens, len(shards), written, len(shards) - written,
             time.monotonic() - started)
    return manifest
