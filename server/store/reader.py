"""Open a committed token store for serving: global per-sample arrays and memory-mapped shards.

A local store's shards are mapped where they lie. A remote store's samples are read into memory (and checksummed)
when it opens, and its token shards are fetched whole through the node-local shard cache (shard_maps.py): one
request per sample would be about 100x slower than a memory map.

Opening reads the manifest and the samples index (`index.samples.parquet`, one file, in parallel ranged reads
when large); a store committed before the index existed has each shard's samples table read instead, up to
READERS at a time. Either way the columns go straight into preallocated arrays, so memory holds the arrays plus
what is being read, not a second copy of every sample. Nothing else is asked of a remote store per shard (its
token shards are checked for size and checksum when fetched: a missing one is DATA_LOSS naming the fix), so
opening costs a few requests, not a few per shard. What is held per sample (the epoch layout needs every
sample's shard and length, the mixing its source, file, row and task):
shard 4 + offset 8 + length 8 + prompt tokens 4 + source 4 + file 4 + row 8 + task 4 = 44 bytes.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ..rows.spans import MaskedSpans
from .format import (
    MANIFEST,
    SAMPLE_COLUMNS,
    SAMPLES_INDEX,
    Manifest,
    StoreDamaged,
    StoreOutdated,
    ints,
    read_bytes_retrying,
    read_manifest,
    samples_tables,
    shard_problem,
)
from .fs import StoreFS
from .lease import has_lease, holder
from .retry import storage_retry
from .shard_cache import ShardCache
from .shard_maps import ShardMaps

log = logging.getLogger(__name__)

READERS = 32
"""Concurrent reads when a store opens: samples tables (a store without a samples index) or ranges of the index."""
RANGE_BYTES = 8 << 20
"""A samples index larger than this is read in ranges of this size, in parallel."""


@dataclass
class TokenStore:
    """A verified store: per-sample arrays in store order, and each shard's tokens mapped on demand."""

    fs: StoreFS
    path: str  # the store's folder on fs
    manifest: Manifest
    shard: np.ndarray  # per sample: index of its shard in manifest.shards
    offsets: np.ndarray  # per sample: where its ids start in its shard's tokens
    lengths: np.ndarray
    prompt_tokens: np.ndarray  # per sample: its masked prefix, as stored
    masked: MaskedSpans  # per sample: every masked token range (prefix included)
    source: np.ndarray
    file: np.ndarray
    row: np.ndarray
    task: np.ndarray  # per sample: index into task_types, -1 for none
    task_types: list[str]
    shards: ShardMaps
    samples_bytes_read: int  # the samples index or tables' bytes read from a remote store when it opened

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def location(self) -> str:
        """The store's folder as people write it."""
        return self.fs.uri(self.path)

    def bytes_fetched(self) -> int:
        """Bytes this process read from a remote store: its samples and the token shards it fetched."""
        return self.samples_bytes_read + self.shards.bytes_fetched()


def verify_store(fs: StoreFS, path: str, fingerprint: str, *, verify: bool = True) -> Manifest:
    """The store's manifest once every shard's files are there with their sizes (and checksums when verify);
    StoreDamaged with the reason otherwise (StoreOutdated for an older format)."""
    manifest = read_manifest(fs, path, fingerprint)
    for facts in manifest.shards:
        problem = shard_problem(fs, path, facts, verify=verify)
        if problem:
            raise StoreDamaged(problem)
    return manifest


class _Columns:
    """The per-sample arrays of a store, filled in store order from samples tables (or the index's batches)."""

    def __init__(self, manifest: Manifest) -> None:
        n = manifest.samples
        self.lengths = np.empty(n, dtype=np.int64)
        self.prompt_tokens = np.empty(n, dtype=np.int32)
        self.source = np.empty(n, dtype=np.int32)
        self.file = np.empty(n, dtype=np.int32)
        self.row = np.empty(n, dtype=np.int64)
        self.task = np.empty(n, dtype=np.int32)
        self.task_ids: dict[str, int] = {}  # in order of first appearance
        self.later: list[tuple[int, pa.Array]] = []  # (first sample, its masked_spans lists) where any
        self.filled = 0

    def add(self, table: pa.Table | pa.RecordBatch) -> None:
        """The next samples, in store order; ValueError if there are more than the manifest counts."""
        lo, hi = self.filled, self.filled + table.num_rows
        if hi > len(self.lengths):
            raise ValueError(f"more than the manifest's {len(self.lengths)} samples")
        for name, out in (("length", self.lengths), ("prompt_tokens", self.prompt_tokens), ("source", self.source),
                          ("file", self.file), ("row", self.row)):
            out[lo:hi] = ints(_array(table.column(name)))
        encoded = _array(table.column("task_type")).dictionary_encode(null_encoding="encode")  # none: an entry
        ids = np.array([-1 if t is None else self.task_ids.setdefault(t, len(self.task_ids))
                        for t in encoded.dictionary.to_pylist()], dtype=np.int32)
        self.task[lo:hi] = ids[ints(encoded.indices)]
        if "masked_spans" in table.column_names:
            spans = _array(table.column("masked_spans"))
            if len(spans.flatten()):
                self.later.append((lo, spans))
        self.filled = hi

    def masked(self) -> MaskedSpans:
        """Every sample's masked token ranges: its prefix, then its `masked_spans`."""
        counts = np.zeros(len(self.lengths), dtype=np.int64)
        for lo, spans in self.later:
            counts[lo:lo + len(spans)] = _list_lengths(spans) // 2
        values = [ints(spans.flatten()).astype(np.int32) for _, spans in self.later]
        later = MaskedSpans(np.concatenate(values) if values else np.zeros(0, dtype=np.int32),
                            np.concatenate(([0], np.cumsum(counts))))
        return MaskedSpans.join_prefix(self.prompt_tokens, later)


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _list_lengths(lists: pa.ListArray) -> np.ndarray:
    """Each list's length, 0 for a null one, as `flatten` counts them (with numpy: pyarrow.compute costs a start
    30 ms to import)."""
    lengths = ints(lists.value_lengths()) if not lists.null_count else \
        np.nan_to_num(lists.value_lengths().to_numpy(zero_copy_only=False), nan=0)
    return lengths.astype(np.int64)


def _read_index(fs: StoreFS, path: str, manifest: Manifest, pool: Executor) -> bytes | None:
    """The samples index's bytes, checked; None (with a warning) if it is missing, damaged or not this store's."""
    index = manifest.usable_index
    if index is None:
        if manifest.samples_index is not None:
            log.warning("token store %s: its samples index does not match its shards; reading the shards' samples "
                        "tables instead", fs.uri(path))
        return None
    where, size = f"{path}/{SAMPLES_INDEX}", index.file.size
    try:
        data = _read_ranges(fs, where, size, pool) if size > RANGE_BYTES else read_bytes_retrying(fs, where)
    except FileNotFoundError:
        data = None
    if data is None or len(data) != size or xxhash.xxh3_64_hexdigest(data) != index.file.xxh3:
        log.warning("token store %s: its samples index %s is %s; reading the shards' samples tables instead",
                    fs.uri(path), fs.uri(where), "missing" if data is None else "damaged")
        return None
    return data


def _read_ranges(fs: StoreFS, where: str, size: int, pool: Executor) -> bytes:
    """A large file read in RANGE_BYTES ranges at once (each tried again through transient failures)."""
    with fs.fs.open_input_file(where) as f:
        def read(offset: int) -> bytes:
            retries = storage_retry().start()
            while True:
                try:
                    return f.read_at(min(RANGE_BYTES, size - offset), offset)
                except OSError as err:
                    if fs.is_local or not retries.wait():
                        raise
                    log.warning("reading %s failed (%s: %s); trying again", fs.uri(where), type(err).__name__, err)

        return b"".join(pool.map(read, range(0, size, RANGE_BYTES)))


def _fill_from_index(columns: _Columns, data: bytes, manifest: Manifest) -> bool:
    """Fill the arrays from the samples index; False (with a warning) if it cannot be read or disagrees with the
    manifest's counts (the columns are then filled again from the shards' tables)."""
    try:
        index = pq.ParquetFile(pa.BufferReader(data))
        present = [c for c in SAMPLE_COLUMNS if c in index.schema_arrow.names]  # masked_spans: not in older ones
        for batch in index.iter_batches(columns=present, use_threads=False):
            columns.add(batch)
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        log.warning("the samples index is unreadable (%s); reading the shards' samples tables instead", err)
        return False
    counts = np.array([s.samples for s in manifest.shards], dtype=np.int64)
    if columns.filled == manifest.samples:
        ends = np.cumsum(counts)
        cum = np.concatenate(([0], np.cumsum(columns.lengths)))
        tokens = np.array([s.tokens for s in manifest.shards], dtype=np.int64)
        sources = np.repeat(np.array([s.source for s in manifest.shards], dtype=np.int32), counts)
        if (cum[ends] - cum[ends - counts] == tokens).all() and (columns.source == sources).all():
            return True
    log.warning("the samples index disagrees with the manifest's counts; reading the shards' samples tables instead")
    return False


def _fill(fs: StoreFS, path: str, manifest: Manifest, pool: Executor) -> tuple[_Columns, int]:
    """Every sample's columns, from the samples index where usable, else from each shard's samples table; and the
    bytes read."""
    data = _read_index(fs, path, manifest, pool)
    columns = _Columns(manifest)
    if data is not None and _fill_from_index(columns, data, manifest):
        return columns, len(data)
    columns = _Columns(manifest)
    for table in samples_tables(fs, path, manifest.shards, pool, ahead=2 * READERS):
        columns.add(table)
    return columns, sum(s.samples_file.size for s in manifest.shards)


def open_store(fs: StoreFS, path: str, fingerprint: str, *, shard_cache: ShardCache | None = None,
               verify: bool = True) -> TokenStore:
    """Open the store at path; StoreDamaged if its manifest is invalid, or a shard's file is missing,
    truncated, fails its checksum, or disagrees with the manifest's counts. A remote store's token shards are
    read through `shard_cache` (and checked as they are fetched; without a cache they cannot be read)."""
    if fs.is_local:
        manifest = verify_store(fs, path, fingerprint, verify=verify)
    else:  # no request per shard file: token shards are checked when fetched, samples tables when read
        manifest = read_manifest(fs, path, fingerprint)
    with ThreadPoolExecutor(READERS, thread_name_prefix="store-open") as pool:
        columns, read = _fill(fs, path, manifest, pool)
    counts = np.array([s.samples for s in manifest.shards], dtype=np.int64)
    shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    cum = np.concatenate(([0], np.cumsum(columns.lengths)))
    offsets = cum[:-1] - np.repeat(cum[np.cumsum(counts) - counts], counts)
    del cum
    return TokenStore(fs, path, manifest, shard, offsets, columns.lengths, columns.prompt_tokens, columns.masked(),
                      columns.source,
                      columns.file, columns.row, columns.task, list(columns.task_ids),
                      ShardMaps(fs, path, manifest, shard_cache), 0 if fs.is_local else read)


def store_entry(fs: StoreFS, path: str) -> dict[str, Any]:
    """A store folder's summary from its manifest alone (state `ready`, `outdated`, `damaged` with the reason,
    or `partial` when shards are written but no manifest commits them, with who holds its build lease)."""
    entry: dict[str, Any] = {"path": fs.uri(path), "fingerprint": path.rsplit("/", 1)[1], "state": "ready"}
    try:
        manifest = read_manifest(fs, path)
    except StoreOutdated as err:
        entry.update(state="outdated", reason=str(err))
    except StoreDamaged as err:
        state = "partial" if not fs.exists(f"{path}/{MANIFEST}") else "damaged"
        entry.update(state=state, reason=str(err))
        builder = holder(fs.uri(path)) if has_lease(fs.uri(path)) else None
        if builder is not None:
            entry["reason"] += (f"; building by {builder.label}" if builder.alive
                                else f"; its builder {builder.label} is gone (the next start takes over)")
    else:
        entry.update(dataset=manifest.dataset, samples=manifest.samples, tokens=manifest.tokens,
                     shards=len(manifest.shards), bytes=manifest.bytes, created=manifest.created,
                     built_by=manifest.built_by, engine=manifest.engine)
    return entry


def list_stores(fs: StoreFS) -> list[dict[str, Any]]:
    """Every store folder under the root, with its manifest's summary (sizes and checksums are not read)."""
    return [store_entry(fs, info.path) for info in sorted(fs.listdir(fs.root), key=lambda i: i.path)
            if info.type.name == "Directory" and re.fullmatch(r"[0-9a-f]{16}", info.base_name)]
