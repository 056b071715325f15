"""Masked token ranges in the token store: written compactly (a prefix column plus a list column of further
ranges), read back exactly from the samples index or the shards' tables, format 3 only when there are further
ranges, and stores written before the column existed still read (their prefix alone)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from sigil_feed.server.rows.spans import MaskedSpans
from sigil_feed.server.store.format import (
    MANIFEST,
    FileFacts,
    Manifest,
    ShardFacts,
    ShardRows,
    StoreDamaged,
    TokenFacts,
    manifest_format,
    read_manifest,
    shard_name,
    shard_paths,
    store_dir,
    write_manifest,
    write_shard,
)
from sigil_feed.server.store.fs import StoreFS, resolve
from sigil_feed.server.store.reader import open_store

FP = "c" * 16
LENGTHS = [[9, 4, 12], [7, 30]]
MASKED = [[[0, 3, 5, 7], [], [2, 4, 6, 8, 10, 12]], [[0, 7], [0, 1, 3, 10, 20, 30]]]  # per shard, per sample


def build(root: Path, masked: list[list[list[int]]], *, index: bool = True) -> tuple[StoreFS, str, list[ShardFacts]]:
    fs = resolve(str(root))
    store = store_dir(fs, FP)
    shards = []
    for k, (lengths, spans) in enumerate(zip(LENGTHS, masked, strict=True)):
        ids = np.arange(sum(lengths)) % 100
        rows = ShardRows.of(ids, np.array(lengths), MaskedSpans.of(spans), np.zeros(len(lengths)),
                            np.arange(len(lengths)), [None] * len(lengths))
        shards.append(write_shard(fs, store, shard_name(FP, k, ["f", k]), [rows], source=k, dtype="<u2"))
    commit(fs, store, shards, index=index)
    return fs, store, shards


def commit(fs: StoreFS, store: str, shards: list[ShardFacts], *, index: bool = True) -> None:
    manifest = Manifest(format=manifest_format(shards), fingerprint=FP, dtype="<u2",
                        samples=sum(s.samples for s in shards), tokens=sum(s.tokens for s in shards), created=1.0,
                        dataset="d", shards=shards, sources=[], tokenizer_fingerprint="t",
                        token_facts=TokenFacts(vocab_size=100, eos_id=1, pad_id=0))
    if index:
        write_manifest(fs, store, manifest)
    else:  # a store committed before the samples index existed
        fs.write_bytes(f"{store}/{MANIFEST}", manifest.model_dump_json().encode())


def spans_of(store_masked: MaskedSpans) -> list[list[int]]:
    return [store_masked.sample(i).reshape(-1).tolist() for i in range(len(store_masked))]


@pytest.mark.parametrize("index", [True, False])
def test_masked_ranges_round_trip_as_format_3(tmp_path: Path, index: bool) -> None:
    fs, store, shards = build(tmp_path, MASKED, index=index)
    assert [s.masked_spans for s in shards] == [4, 2]  # the ranges after each sample's prefix
    assert read_manifest(fs, store, FP).format == 3
    opened = open_store(fs, store, FP)
    assert spans_of(opened.masked) == [s for shard in MASKED for s in shard]
    assert opened.prompt_tokens.tolist() == [3, 0, 0, 7, 1]


def test_prefix_only_stores_stay_format_2(tmp_path: Path) -> None:
    prefixes = [[[0, 3], [], [0, 12]], [[0, 7], [0, 1]]]
    fs, store, _ = build(tmp_path, prefixes)
    assert read_manifest(fs, store, FP).format == 2
    assert spans_of(open_store(fs, store, FP).masked) == [s for shard in prefixes for s in shard]


def rewrite(fs: StoreFS, path: str, table: pa.Table) -> FileFacts:
    """Write a Parquet file; its facts."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    data = buffer.getvalue().to_pybytes()
    fs.write_bytes(path, data)
    return FileFacts(size=len(data), xxh3=xxhash.xxh3_64_hexdigest(data))


def drop_masked_column(fs: StoreFS, store: str, facts: ShardFacts) -> ShardFacts:
    """The shard's samples table as a version before `masked_spans` wrote it, and its facts to match."""
    path = shard_paths(store, facts.name)[1]
    old = facts.model_copy(update={"samples_file": rewrite(
        fs, path, pq.read_table(pa.BufferReader(fs.read_bytes(path))).drop_columns(["masked_spans"]))})
    fs.write_bytes(shard_paths(store, facts.name)[2], old.model_dump_json(exclude={"masked_spans"}).encode())
    return old


@pytest.mark.parametrize("index", [True, False])
def test_a_store_written_before_the_column_reads_its_prefixes(tmp_path: Path, index: bool,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    prefixes = [[[0, 3], [], [0, 12]], [[0, 7], [0, 1]]]
    fs, store, shards = build(tmp_path, prefixes)
    fs.delete(f"{store}/{MANIFEST}")
    fs.delete(f"{store}/index.samples.parquet")
    commit(fs, store, [drop_masked_column(fs, store, s) for s in shards], index=index)
    if index:  # the index as that version wrote it: without the column
        manifest = read_manifest(fs, store, FP)
        assert manifest.samples_index is not None
        where = f"{store}/index.samples.parquet"
        data = rewrite(fs, where, pq.read_table(pa.BufferReader(fs.read_bytes(where))).drop_columns(["masked_spans"]))
        entry = manifest.samples_index.model_copy(update={"file": data})
        fs.write_bytes(f"{store}/{MANIFEST}", manifest.model_copy(update={"samples_index": entry}).model_dump_json()
                       .encode())
    with caplog.at_level(logging.WARNING):
        opened = open_store(fs, store, FP)
    assert spans_of(opened.masked) == [s for shard in prefixes for s in shard]
    assert not caplog.records  # an index without the column is used, not read around


def test_a_manifest_whose_format_disagrees_with_its_shards_is_damaged(tmp_path: Path) -> None:
    fs, store, _ = build(tmp_path, MASKED)
    path = f"{store}/{MANIFEST}"
    fs.write_bytes(path, fs.read_bytes(path).replace(b'"format": 3', b'"format": 2', 1))
    with pytest.raises(StoreDamaged, match="format 2, but its shards make it format 3"):
        read_manifest(fs, store, FP)
