"""Open a committed token store for serving: global per-sample arrays and memory-mapped shards.

A local store's shards are mapped where they lie. A remote store's samples tables are read into memory (and
checksummed) when it opens, and its token shards are fetched whole through the node-local shard cache
(shard_maps.py): one request per sample would be about 100x slower than a memory map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from .format import (
    MANIFEST,
    SAMPLE_COLUMNS,
    Manifest,
    ShardFacts,
    StoreDamaged,
    StoreOutdated,
    read_manifest,
    samples_table,
    shard_paths,
    shard_problem,
)
from .fs import StoreFS
from .lease import has_lease, holder
from .shard_cache import ShardCache
from .shard_maps import ShardMaps


@dataclass
class TokenStore:
    """A verified store: per-sample arrays in store order, and each shard's tokens mapped on demand."""

    fs: StoreFS
    path: str  # the store's folder on fs
    manifest: Manifest
    shard: np.ndarray  # per sample: index of its shard in manifest.shards
    offsets: np.ndarray  # per sample: where its ids start in its shard's tokens
    lengths: np.ndarray
    prompt_tokens: np.ndarray
    source: np.ndarray
    file: np.ndarray
    row: np.ndarray
    task: np.ndarray  # per sample: index into task_types, -1 for none
    task_types: list[str]
    shards: ShardMaps
    samples_bytes_read: int  # the samples tables' bytes read from a remote store when it opened

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def location(self) -> str:
        """The store's folder as people write it."""
        return self.fs.uri(self.path)

    def bytes_fetched(self) -> int:
        """Bytes this process read from a remote store: its samples tables and the token shards it fetched."""
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


def _read_parquet(data: bytes, columns: list[str]) -> pa.Table:
    """A Parquet file held in `data`, read and decoded on the calling thread. Not `pq.read_table`: it scans
    through Arrow's thread pool, whose workers can drop the last reference to `data` after the call returned;
    a worker that does so while the interpreter exits (a `cache build` that only opened the store) cannot take
    the GIL and aborts the process (`terminate called without an active exception`, SIGABRT)."""
    with pq.ParquetFile(pa.BufferReader(data)) as reader:
        return reader.read(columns=columns, use_threads=False)


def _samples(fs: StoreFS, path: str, facts: ShardFacts) -> pa.Table:
    """A shard's samples table, read whole and checked against its facts."""
    where = shard_paths(path, facts.name)[1]
    try:
        data = fs.read_bytes(where)
    except FileNotFoundError:
        raise StoreDamaged(f"{fs.uri(where)}: missing") from None
    if len(data) != facts.samples_file.size or xxhash.xxh3_64_hexdigest(data) != facts.samples_file.xxh3:
        raise StoreDamaged(f"{fs.uri(where)}: checksum mismatch (corrupted)")
    try:  # read on this thread: see _read_parquet
        table = _read_parquet(data, list(SAMPLE_COLUMNS))
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise StoreDamaged(f"{fs.uri(where)}: unreadable ({err})") from None
    if table.num_rows != facts.samples:
        raise StoreDamaged(f"{fs.uri(where)}: {table.num_rows} rows, but the manifest counts {facts.samples}")
    lengths = table["length"].to_numpy()
    if int(lengths.sum()) != facts.tokens:
        raise StoreDamaged(f"{fs.uri(where)}: lengths sum to {int(lengths.sum())}, but the manifest counts "
                           f"{facts.tokens} tokens")
    return table


def open_store(fs: StoreFS, path: str, fingerprint: str, *, shard_cache: ShardCache | None = None,
               verify: bool = True) -> TokenStore:
    """Open the store at path; StoreDamaged if its manifest is invalid, or a shard's file is missing,
    truncated, fails its checksum, or disagrees with the manifest's counts. A remote store's token shards are
    read through `shard_cache` (and checked as they are fetched; without a cache they cannot be read)."""
    manifest = verify_store(fs, path, fingerprint, verify=verify and fs.is_local)  # remote: checked on fetch
    tables = [_samples(fs, path, facts) for facts in manifest.shards]
    table = pa.concat_tables(tables) if tables else samples_table([], 0)
    lengths = table["length"].to_numpy().astype(np.int64)
    counts = np.array([s.samples for s in manifest.shards], dtype=np.int64)
    shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    ends = np.cumsum(lengths)
    shard_starts = np.repeat(np.concatenate(([0], np.cumsum([s.tokens for s in manifest.shards])))[:-1], counts)
    offsets = ends - lengths - shard_starts
    tasks = table["task_type"].combine_chunks().dictionary_encode()
    task = tasks.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    return TokenStore(fs, path, manifest, shard, offsets, lengths, table["prompt_tokens"].to_numpy(),
                      table["source"].to_numpy(), table["file"].to_numpy(), table["row"].to_numpy(),
                      task, tasks.dictionary.to_pylist(), ShardMaps(fs, path, manifest, shard_cache),
                      0 if fs.is_local else sum(s.samples_file.size for s in manifest.shards))


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
