"""Token store formats 2 and 3: shards plus a manifest, on any filesystem pyarrow understands (see fs.py).

A store is `<root>/<fingerprint>/`:
- `shards/<shard>.tokens.bin`: the shard's token ids (EOS included), concatenated, little-endian `uint16`
  when the vocabulary fits, else `int32` (the dtype is in the manifest);
- `shards/<shard>.samples.parquet`: one row per sample, in shard order: `length` (int32), `prompt_tokens`
  (int32, the loss-masked prefix), `source` (int32), `file` (int32), `row` (int64; (source, file, row) is the
  stable sample id), `task_type` (string, null if none), `masked_spans` (list of int32: the sample's further
  masked token ranges after the `prompt_tokens` prefix, as flat [start, end) pairs; a conversation's turns other
  than the assistant's; empty for other samples; absent from stores written before it existed);
- `shards/<shard>.json`: the shard's facts, written after its two files: a rerun skips a shard whose facts
  are there and whose files match them;
- `index.samples.parquet`: every shard's samples table in store order, in one file, written at commit (stores
  committed before it have none): a server opening the store reads it, not one table per shard. The manifest
  names it with its size and checksum and a digest of the shards' samples files it was made from; one that
  disagrees with them is not used (the shards' own tables are read instead);
- `manifest.json`: format, fingerprint, dtype, counts, every shard's facts in store order, per-source
  accounting, the tokenizer's facts. It is written last and is the commit point: a folder without it is not
  a store (object stores cannot rename a folder atomically).

A store whose samples have `masked_spans` is written as format 3, any other as format 2 (as before the column
existed), so that a server of an older version, which would ignore the column and train on those tokens,
refuses the store instead ("format 3, this server reads format 2"); this version reads both.

Shard names derive from their inputs (`shard_name`), so every engine and every rerun names a shard alike.
The store's sample sequence is the shards in manifest order, each shard's samples in order: per source, per
file, in file order, curated (splits and filters applied), not mixed and without task-weight copies, which
are serve-time decisions.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..rows.spans import MaskedSpans
from .fs import StoreFS
from .retry import storage_retry

log = logging.getLogger(__name__)

FORMAT_VERSION: Literal[2] = 2  # the oldest format read; a store with masked spans is written as MASKED_FORMAT
MASKED_FORMAT: Literal[3] = 3
MANIFEST = "manifest.json"
SAMPLES_INDEX = "index.samples.parquet"
INDEX_ROW_GROUP = 1 << 20  # samples per row group of the samples index
SHARDS = "shards"
TOKENS_SUFFIX, SAMPLES_SUFFIX, FACTS_SUFFIX = ".tokens.bin", ".samples.parquet", ".json"
SAMPLE_COLUMNS = ("length", "prompt_tokens", "source", "file", "row", "task_type", "masked_spans")

Count = Annotated[int, Field(ge=0)]


class StoreDamaged(Exception):
    """A store is incomplete or corrupt; the message says what is wrong."""


class StoreOutdated(StoreDamaged):
    """A store of an older format, which this server rebuilds."""

    def __init__(self, message: str, format: int) -> None:
        super().__init__(message)
        self.format = format


def ids_dtype(vocab_size: int) -> np.dtype:
    """The dtype of stored token ids: uint16 when every id fits, else int32 (the wire uses the same rule)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def shard_name(content_fingerprint: str, source: int, identity: Any, part: int = 0) -> str:
    """A shard's name, derived from its inputs: the store's content fingerprint, the source's index, the
    identity of what it reads (a file's index and content identity, or a Hugging Face dataset's fingerprint) and
    the part of that input. `s{source:03d}-{hash16}`: names sort by source."""
    key = json.dumps([content_fingerprint, source, identity, part], sort_keys=True, default=str).encode()
    return f"s{source:03d}-{xxhash.xxh3_64_hexdigest(key)}"


def store_dir(fs: StoreFS, fingerprint: str) -> str:
    """Where the store of a content fingerprint lives on fs."""
    return fs.path(fingerprint)


def shard_paths(store: str, name: str) -> tuple[str, str, str]:
    """The shard's tokens, samples and facts files."""
    base = f"{store}/{SHARDS}/{name}"
    return base + TOKENS_SUFFIX, base + SAMPLES_SUFFIX, base + FACTS_SUFFIX


class FileFacts(BaseModel):
    """One file of a shard: its size and xxh3-64 checksum."""

    model_config = ConfigDict(strict=True, frozen=True)

    size: Count
    xxh3: str = Field(pattern=r"^[0-9a-f]{16}$")


class SourceSnapshot(BaseModel):
    """One source's accounting from a build's pass (see SourceCounters.snapshot)."""

    model_config = ConfigDict(strict=True, frozen=True)

    spec: str
    read: Count
    kept: Count
    dropped: dict[str, Count]
    malformed: dict[str, Count]
    tokens: Count
    lengths: list[Count]


class ShardFacts(BaseModel):
    """One shard: its name, source, counts, both files' facts, and (optionally) the accounting of its input."""

    model_config = ConfigDict(strict=True, frozen=True)

    name: str = Field(pattern=r"^s\d{3,}-[0-9a-f]{16}$")
    source: Count
    samples: Count
    tokens: Count
    dtype: Literal["<u2", "<i4"]
    tokens_file: FileFacts
    samples_file: FileFacts
    accounting: SourceSnapshot | None = None  # the records of this shard's input: read, kept, dropped, ...
    masked_spans: Count = 0  # masked token ranges in its `masked_spans` column (a store with any is format 3)

    @model_validator(mode="after")
    def _sizes_agree(self) -> ShardFacts:
        itemsize = np.dtype(self.dtype).itemsize
        if self.tokens_file.size != self.tokens * itemsize:
            raise ValueError(f"shard {self.name}: tokens file of {self.tokens_file.size} bytes, but {self.tokens} "
                             f"tokens of {itemsize} bytes")
        return self


class SamplesIndex(BaseModel):
    """The store's samples index (`index.samples.parquet`): its file, and which shards' samples files it holds."""

    model_config = ConfigDict(strict=True, frozen=True)

    file: FileFacts
    shards: str = Field(pattern=r"^[0-9a-f]{16}$")  # samples_index_key of the shards it was made from


def samples_index_key(shards: Iterable[ShardFacts]) -> str:
    """xxh3-64 of the shards' names and samples files' checksums, in store order: what a samples index holds."""
    return xxhash.xxh3_64_hexdigest(json.dumps([[s.name, s.samples_file.xxh3] for s in shards]).encode())


@dataclass(frozen=True)
class TokenFacts:
    """What clients and the packer need to know of a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int


class InputFile(BaseModel):
    """One file a store was built from: where it was then (for people), and its content identity (what counts)."""

    model_config = ConfigDict(strict=True, frozen=True)

    path: str
    identity: list[Any]


class Manifest(BaseModel):
    """`manifest.json`: the commit point of a store, and everything the server needs to serve it."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    format: Literal[2, 3]  # see manifest_format
    fingerprint: str
    dtype: Literal["<u2", "<i4"]
    samples: Count
    tokens: Count
    created: float
    dataset: str
    shards: list[ShardFacts]  # in store order
    sources: list[SourceSnapshot]
    tokenizer_fingerprint: str
    tokenizer_backend: Literal["hf", "fastokens"] = "hf"  # which encoder built it (the ids are the same)
    token_facts: TokenFacts
    engine: str = "local"
    built_by: str = ""
    samples_index: SamplesIndex | None = None  # written at commit; None in stores committed before
    inputs: list[list[InputFile]] | None = None  # per source, its files in order; None in stores committed before

    @model_validator(mode="after")
    def _counts_agree(self) -> Manifest:
        if self.format != manifest_format(self.shards):
            raise ValueError(f"format {self.format}, but its shards make it format {manifest_format(self.shards)}")
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise ValueError("shard names repeat")
        if any(s.dtype != self.dtype for s in self.shards):
            raise ValueError(f"a shard's dtype is not the store's {self.dtype}")
        for total, field in ((self.samples, "samples"), (self.tokens, "tokens")):
            if sum(getattr(s, field) for s in self.shards) != total:
                raise ValueError(f"the shards' {field} do not sum to {total}")
        return self

    @property
    def bytes(self) -> int:
        """The store's size: every shard's files and the samples index."""
        index = self.samples_index.file.size if self.samples_index is not None else 0
        return index + sum(s.tokens_file.size + s.samples_file.size for s in self.shards)

    @property
    def usable_index(self) -> SamplesIndex | None:
        """The samples index, if it holds exactly these shards' samples files (else None)."""
        index = self.samples_index
        return index if index is not None and index.shards == samples_index_key(self.shards) else None


def manifest_format(shards: Iterable[ShardFacts]) -> Literal[2, 3]:
    """3 for a store with masked spans (which older servers must refuse), else 2."""
    return MASKED_FORMAT if any(s.masked_spans for s in shards) else FORMAT_VERSION


@dataclass
class ShardRows:
    """A run of one shard's samples, in order: flat token ids and one entry per sample."""

    ids: np.ndarray  # every sample's ids, concatenated
    lengths: np.ndarray  # tokens per sample; sums to len(ids)
    prompt_tokens: np.ndarray  # the masked prefix of each sample
    file: np.ndarray
    row: np.ndarray
    task_type: list[str | None]
    later_masked: MaskedSpans | None = None  # the masked ranges after the prefix; None: none

    @classmethod
    def of(cls, ids: np.ndarray, lengths: np.ndarray, masked: MaskedSpans, file: np.ndarray, row: np.ndarray,
           task_type: list[str | None]) -> ShardRows:
        """From every masked range of each sample (the leading one goes to prompt_tokens)."""
        prefix, later = masked.split_prefix()
        return cls(ids, lengths, prefix, file, row, task_type, later)

    def later(self) -> MaskedSpans:
        """The masked ranges after the prefix."""
        return self.later_masked or MaskedSpans.none(len(self.lengths))


class _Checksummed:
    """Counts and checksums what is written through it."""

    def __init__(self, out: pa.NativeFile) -> None:
        self.out, self.digest, self.size = out, xxhash.xxh3_64(), 0

    def write(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.digest.update(data)
        self.size += len(data)

    def facts(self) -> FileFacts:
        return FileFacts(size=self.size, xxh3=self.digest.hexdigest())


def samples_table(rows: list[ShardRows], source: int) -> pa.Table:
    """A shard's samples table (see the module's layout)."""
    def column(name: str, dtype: type) -> np.ndarray:
        parts: list[np.ndarray] = [np.asarray(getattr(r, name), dtype=dtype) for r in rows]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    lengths = column("lengths", np.int32)
    later = MaskedSpans.concat([r.later() for r in rows])
    spans = pa.ListArray.from_arrays(pa.array(2 * later.offsets, pa.int32()), pa.array(later.bounds, pa.int32()))
    return pa.table({"length": lengths, "prompt_tokens": column("prompt_tokens", np.int32),
                     "source": np.full(len(lengths), source, dtype=np.int32), "file": column("file", np.int32),
                     "row": column("row", np.int64),
                     "task_type": pa.array([t for r in rows for t in r.task_type], type=pa.string()),
                     "masked_spans": spans})


def write_shard(fs: StoreFS, store: str, name: str, chunks: Iterable[ShardRows], *, source: int,
                dtype: np.dtype | str,
                accounting: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> ShardFacts:
    """Write a shard from its runs of samples (ids streamed, the samples table at the end), then its facts
    file; returns the facts. Each file appears whole or not at all. `accounting` (a SourceSnapshot's fields,
    or a function giving them once the chunks are consumed) records what the shard's input held."""
    dtype = np.dtype(dtype).newbyteorder("<")
    tokens_path, samples_path, facts_path = shard_paths(store, name)
    kept: list[ShardRows] = []
    n_tokens = 0
    with fs.open_write(tokens_path) as out:
        tokens = _Checksummed(out)
        for chunk in chunks:
            lengths = np.asarray(chunk.lengths, dtype=np.int64)
            if int(lengths.sum()) != len(chunk.ids) or len(chunk.task_type) != len(lengths):
                raise ValueError(f"shard {name}: a chunk's lengths, ids and task types disagree")
            ids = np.ascontiguousarray(chunk.ids, dtype=dtype)
            tokens.write(ids.data.cast("B"))
            n_tokens += len(ids)
            kept.append(ShardRows(np.zeros(0, dtype=dtype), lengths, chunk.prompt_tokens, chunk.file, chunk.row,
                                  list(chunk.task_type), chunk.later_masked))
    table = samples_table(kept, source)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    data = buffer.getvalue().to_pybytes()
    fs.write_bytes(samples_path, data)
    if callable(accounting):
        accounting = accounting()
    facts = ShardFacts(name=name, source=source, samples=table.num_rows, tokens=n_tokens,
                       dtype=dtype.str,  # type: ignore[arg-type]
                       tokens_file=tokens.facts(),
                       samples_file=FileFacts(size=len(data), xxh3=xxhash.xxh3_64_hexdigest(data)),
                       masked_spans=sum(len(r.later().bounds) // 2 for r in kept),
                       accounting=SourceSnapshot.model_validate(accounting) if accounting is not None else None)
    fs.write_bytes(facts_path, facts.model_dump_json().encode())
    return facts


def read_shard_facts(fs: StoreFS, store: str, name: str) -> ShardFacts | None:
    """A shard's facts file, None if it is missing or invalid (the shard is then not complete)."""
    try:
        return ShardFacts.model_validate_json(fs.read_bytes(shard_paths(store, name)[2]))
    except (OSError, ValueError):
        return None


def checksum(fs: StoreFS, path: str) -> str:
    """xxh3-64 of a file, read in chunks."""
    digest = xxhash.xxh3_64()
    with fs.fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problem(fs: StoreFS, store: str, facts: ShardFacts, *, verify: bool = True) -> str | None:
    """What is wrong with a shard's files (missing, truncated, or, when verify, failing its checksum), else None."""
    tokens_path, samples_path, _ = shard_paths(store, facts.name)
    for path, file in ((tokens_path, facts.tokens_file), (samples_path, facts.samples_file)):
        size = fs.size(path)
        if size != file.size:
            return f"{fs.uri(path)}: missing or truncated (expected {file.size} bytes)"
        if verify and checksum(fs, path) != file.xxh3:
            return f"{fs.uri(path)}: checksum mismatch (corrupted)"
    return None


def shard_complete(fs: StoreFS, store: str, facts: ShardFacts, *, verify: bool = True) -> bool:
    """Whether a shard's files are there and match its facts (a rerun skips it)."""
    return shard_problem(fs, store, facts, verify=verify) is None


def read_bytes_retrying(fs: StoreFS, where: str) -> bytes:
    """A whole file, read again through transient failures of remote storage for the storage retry window; past
    it the last error is raised (the store's opening is then tried again later, see builders/lifecycle.py)."""
    retries = storage_retry().start()
    while True:
        try:
            return fs.read_bytes(where)
        except FileNotFoundError:
            raise
        except OSError as err:
            if fs.is_local or not retries.wait():
                raise
            log.warning("reading %s failed (%s: %s); trying again", fs.uri(where), type(err).__name__, err)


_INTS = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64}


def ints(array: pa.Array) -> np.ndarray:
    """An integer column without nulls as numpy, over its buffer (pyarrow's to_numpy would import pandas first,
    half a second of a sidecar's start)."""
    dtype = _INTS.get(array.type)
    if dtype is None or array.null_count:
        return np.asarray(array.to_numpy(zero_copy_only=False))
    size = np.dtype(dtype).itemsize
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * size)


def with_masked_spans(table: pa.Table) -> pa.Table:
    """A samples table with the columns this version writes, in order: one written before `masked_spans` existed
    gets it, empty."""
    if "masked_spans" not in table.column_names:
        table = table.append_column("masked_spans", pa.array([[]] * table.num_rows, pa.list_(pa.int32())))
    return table.select(list(SAMPLE_COLUMNS))


def read_parquet(data: bytes, columns: list[str] | None) -> pa.Table:
    """A Parquet file held in `data`, read and decoded on the calling thread. Not `pq.read_table`: it scans
    through Arrow's thread pool, whose workers can drop the last reference to `data` after the call returned;
    a worker that does so while the interpreter exits (a `cache build` that only opened the store) cannot take
    the GIL and aborts the process (`terminate called without an active exception`, SIGABRT)."""
    with pq.ParquetFile(pa.BufferReader(data)) as reader:
        return reader.read(columns=columns, use_threads=False)


def read_samples(fs: StoreFS, store: str, facts: ShardFacts) -> pa.Table:
    """A shard's samples table, read whole and checked against its facts; StoreDamaged if it is not there or
    disagrees with them."""
    where = shard_paths(store, facts.name)[1]
    try:
        data = read_bytes_retrying(fs, where)
    except FileNotFoundError:
        raise StoreDamaged(f"{fs.uri(where)}: missing") from None
    if len(data) != facts.samples_file.size or xxhash.xxh3_64_hexdigest(data) != facts.samples_file.xxh3:
        raise StoreDamaged(f"{fs.uri(where)}: checksum mismatch (corrupted)")
    try:  # on this thread: see read_parquet
        table = with_masked_spans(read_parquet(data, None))
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise StoreDamaged(f"{fs.uri(where)}: unreadable ({err})") from None
    if table.num_rows != facts.samples:
        raise StoreDamaged(f"{fs.uri(where)}: {table.num_rows} rows, but the manifest counts {facts.samples}")
    tokens = sum(int(ints(chunk).sum(dtype=np.int64)) for chunk in table["length"].chunks)
    if tokens != facts.tokens:
        raise StoreDamaged(f"{fs.uri(where)}: lengths sum to {tokens}, but the manifest counts {facts.tokens} tokens")
    return table


def samples_tables(fs: StoreFS, store: str, shards: list[ShardFacts], pool: Executor, *,
                   ahead: int) -> Iterator[pa.Table]:
    """The shards' samples tables in store order (see read_samples), read on `pool` with at most `ahead` read or
    waiting to be taken at once (memory stays bounded)."""
    waiting: deque[Future[pa.Table]] = deque()
    upcoming = iter(shards)
    try:
        for facts in upcoming:
            waiting.append(pool.submit(read_samples, fs, store, facts))
            if len(waiting) >= ahead:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()
    finally:
        for future in waiting:
            future.cancel()


def write_samples_index(fs: StoreFS, store: str, shards: list[ShardFacts], pool: Executor, *,
                        ahead: int = 32) -> SamplesIndex:
    """Write the store's samples index from its shards' samples tables (read back, checked); returns its facts."""
    buffer = pa.BufferOutputStream()
    pending: list[pa.Table] = []
    with pq.ParquetWriter(buffer, samples_table([], 0).schema, compression="zstd") as writer:
        rows = 0
        for table in samples_tables(fs, store, shards, pool, ahead=ahead):
            pending.append(table)
            rows += table.num_rows
            if rows >= INDEX_ROW_GROUP:
                writer.write_table(pa.concat_tables(pending), row_group_size=INDEX_ROW_GROUP)
                pending, rows = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=INDEX_ROW_GROUP)
    data = buffer.getvalue().to_pybytes()
    fs.write_bytes(f"{store}/{SAMPLES_INDEX}", data)
    return SamplesIndex(file=FileFacts(size=len(data), xxh3=xxhash.xxh3_64_hexdigest(data)),
                        shards=samples_index_key(shards))


INDEX_READERS = 32
"""Concurrent reads of samples tables when a samples index is written (and when a store without one opens)."""


def write_manifest(fs: StoreFS, store: str, manifest: Manifest) -> None:
    """Commit a store: write its samples index (unless the manifest names a usable one), then its manifest, last,
    in one piece (locally a rename, on an object store one PUT)."""
    if manifest.shards and manifest.usable_index is None:
        with ThreadPoolExecutor(min(INDEX_READERS, len(manifest.shards)), thread_name_prefix="samples-index") as pool:
            index = write_samples_index(fs, store, manifest.shards, pool)
        manifest = manifest.model_copy(update={"samples_index": index})
    fs.write_bytes(f"{store}/{MANIFEST}", manifest.model_dump_json(indent=1).encode())


def read_manifest(fs: StoreFS, store: str, fingerprint: str | None = None) -> Manifest:
    """The store's validated manifest; StoreDamaged naming the first problems if it is missing, unreadable or
    invalid, StoreOutdated if it is of an older format."""
    where = fs.uri(f"{store}/{MANIFEST}")
    try:
        text = fs.read_bytes(f"{store}/{MANIFEST}")
        data: Any = json.loads(text)
    except FileNotFoundError:
        raise StoreDamaged(f"{where}: missing") from None
    except (OSError, ValueError) as err:
        raise StoreDamaged(f"{where}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise StoreDamaged(f"{where}: not a JSON object")
    if isinstance(data.get("format"), int) and data["format"] < FORMAT_VERSION:
        raise StoreOutdated(f"{where}: format {data['format']}, this server reads formats {FORMAT_VERSION} and "
                            f"{MASKED_FORMAT}", data["format"])
    if data.get("format") not in (FORMAT_VERSION, MASKED_FORMAT):
        raise StoreDamaged(f"{where}: format {data.get('format')!r}, this server reads formats {FORMAT_VERSION} "
                           f"and {MASKED_FORMAT}")
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors()[:5])
        raise StoreDamaged(f"{where}: invalid ({problems})") from None
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise StoreDamaged(f"{where}: fingerprint {manifest.fingerprint} does not match this configuration's "
                           f"{fingerprint}")
    return manifest
