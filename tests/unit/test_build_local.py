"""The local store builder: one shard per part of a source file, a rerun writes only the shards that are not
complete."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sigil_feed.server.builders import local_engine as build_local
from sigil_feed.server.builders.local_engine import PartRecords, SourcePlan, source_parts
from sigil_feed.server.config import load_config
from sigil_feed.server.feed.served import ServedDataset, open_datasets
from sigil_feed.server.pipeline.sources.hf import HfSource
from sigil_feed.server.pipeline.sources.identity import local_file_identities
from sigil_feed.server.pipeline.sources.opening import open_source
from sigil_feed.server.pipeline.tokenize import Encoder
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.store.format import MANIFEST, shard_name, shard_paths
from tests.conftest import rust_pair, write_config, write_jsonl


def dataset(tmp_path: Path, location: str, runtime: Runtime) -> ServedDataset:
    """A cached dataset of three files of ten pairs."""
    config = tmp_path / "c.yaml"
    if not config.exists():
        for f in range(3):
            write_jsonl(tmp_path / "pairs" / f"p{f}.jsonl", [rust_pair(i) for i in range(f * 10, f * 10 + 10)])
        write_config(config, {"names": ["local:pairs"], "use_cache": True, "cache_dir": location})
    return open_datasets(load_config(config), runtime)["default"]


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "cache") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/cache"


def test_a_rerun_writes_only_the_shards_that_are_not_complete(tmp_path: Path, location: str, runtime: Runtime,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = build_local.write_shard

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        written.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(build_local, "write_shard", counting)
    first = dataset(tmp_path, location, runtime)
    first.prepare(show_bar=False)
    assert first.store is not None and len(first.store) == 30 and len(written) == 3
    shards = first.store.manifest.shards
    fs, store = first.lifecycle.fs, first.store_dir
    fs.delete(f"{store}/{MANIFEST}")  # uncommitted, as after a crash before the manifest
    fs.delete(shard_paths(store, shards[1].name)[0])  # and one shard lost its tokens
    written.clear()
    again = dataset(tmp_path, location, runtime)
    again.prepare(show_bar=False)
    assert written == [shards[1].name]
    assert again.store is not None and again.store.manifest.shards == shards
    assert again.counters[0].read == 30 and again.counters[0].kept == 30  # accounting merged from every shard
    written.clear()
    warm = dataset(tmp_path, location, runtime)
    warm.prepare(show_bar=False)
    assert written == []  # a committed store is opened, not rebuilt
    assert warm.encoder._tokenizer is None  # a warm start needs no tokenizer: the manifest has its facts


def split_corpus(tmp_path: Path) -> None:
    """`data/big.jsonl` of 35 lines (a blank line, a malformed line, a record of another split, and ten blank
    lines: the second part of ten has no record), `data/small.jsonl` of 3 pairs, and `grid.parquet` of 25 rows
    in row groups of 7."""
    if (tmp_path / "data").exists():
        return
    big: list = [rust_pair(i) for i in range(35)]
    big[4], big[7], big[23] = " ", "{not json", rust_pair(23, split="valid")
    big[10:20] = [""] * 10
    write_jsonl(tmp_path / "data" / "big.jsonl", big)
    write_jsonl(tmp_path / "data" / "small.jsonl", [rust_pair(i) for i in range(100, 103)])
    pq.write_table(pa.Table.from_pylist([rust_pair(i) for i in range(200, 225)]), tmp_path / "grid.parquet",
                   row_group_size=7)


def built(tmp_path: Path, runtime: Runtime, shard_records: int, cache: str,
          names: list[str] | None = None) -> ServedDataset:
    """The split corpus's dataset with parts of `shard_records` raw records, built (or opened) under `cache`."""
    split_corpus(tmp_path)
    config = write_config(tmp_path / f"{cache}.yaml", {
        "names": names or ["local:data", "parquet:grid.parquet"], "use_cache": True,
        "cache_dir": str(tmp_path / cache), "shard_records": shard_records})
    served = open_datasets(load_config(config), runtime)["default"]
    served.prepare(show_bar=False)
    return served


def tokens(served: ServedDataset) -> np.ndarray:
    """Every token id of a local store, in store order."""
    assert served.store is not None
    return np.concatenate([np.fromfile(shard_paths(served.store_dir, s.name)[0], dtype=served.store.manifest.dtype)
                           for s in served.store.manifest.shards])


def test_a_file_of_n_records_is_ceil_n_over_r_shards_holding_its_rows_and_nothing_else_changes(
        tmp_path: Path, runtime: Runtime) -> None:
    whole, split = built(tmp_path, runtime, 1000, "whole"), built(tmp_path, runtime, 10, "split")
    assert whole.content_fingerprint == split.content_fingerprint  # no sample changes: the same store's content
    assert whole.store is not None and split.store is not None
    assert len(whole.store.manifest.shards) == 3  # big, small, grid: one part each
    shards = split.store.manifest.shards
    assert len(shards) == 4 + 1 + 3  # big: ceil(35/10) (its second part empty, still a shard), small, grid
    rows = [sorted(set(split.store.row[split.store.shard == i].tolist())) for i in range(len(shards))]
    assert [(r[0], r[-1]) if r else () for r in rows] == [
        (0, 9), (), (20, 29), (30, 34), (0, 2), (0, 9), (10, 19), (20, 24)]
    assert rows[0] == [0, 1, 2, 3, 5, 6, 8, 9]  # blank and malformed lines hold no sample
    assert shards[1].samples == 0 and shards[1].accounting is not None and shards[1].accounting.read == 0
    # the same samples, ids, tokens and order as the unsplit store, and the same accounting, summed over parts
    for column in ("source", "file", "row", "lengths", "prompt_tokens"):
        assert np.array_equal(getattr(split.store, column), getattr(whole.store, column)), column
    assert np.array_equal(tokens(split), tokens(whole))
    assert split.store.manifest.sources == whole.store.manifest.sources
    big = split.store.manifest.sources[0]
    assert (big.read, big.kept, big.malformed) == (24 + 3, 22 + 3, {"bad_json": 1})
    assert sum(big.dropped.values()) == 1
    # a file of one part keeps the name of a whole-file shard: stores built before parts stay valid
    small = split.store.manifest.shards[4]
    assert small == whole.store.manifest.shards[1]
    small_file = str(tmp_path / "data" / "small.jsonl")
    assert small.name == shard_name(split._shard_key(0), 0, [local_file_identities([small_file])[0], 0])
    assert not {s.name for s in shards[:4]} & {s.name for s in whole.store.manifest.shards}


@pytest.mark.parametrize("lines, ends", [(20, [10]), (21, [10, 20]), (19, [10])])
def test_a_plain_jsonl_file_is_cut_at_every_rth_line_with_its_byte_offset(tmp_path: Path, lines: int,
                                                                          ends: list[int]) -> None:
    path = write_jsonl(tmp_path / "f.jsonl", [rust_pair(i) for i in range(lines)])
    for text in (path.read_bytes(), path.read_bytes()[:-1]):  # with and without the last newline
        path.write_bytes(text)
        starts = open_source(f"local:{path}", 0, base_dir=tmp_path).part_starts(0, 10)
        assert [s.row for s in starts] == [0, *ends]
        source = open_source(f"local:{path}", 0, base_dir=tmp_path)
        for start in starts:  # the offset finds the row's line
            source.set_state(start)
            assert next(source).row == start.row


def test_a_rerun_after_a_kill_between_parts_writes_and_tokenizes_only_the_missing_parts(
        tmp_path: Path, runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    encoded: list[int] = []
    real_write, real_encode = build_local.write_shard, Encoder.encode

    def killed_at_third(*args, **kwargs):  # type: ignore[no-untyped-def]
        if len(written) == 2:
            raise KeyboardInterrupt  # killed between the second and the third part
        written.append(args[2])
        return real_write(*args, **kwargs)

    def counting(self, samples, *args, **kwargs):  # type: ignore[no-untyped-def]
        encoded.append(len(samples))
        return real_encode(self, samples, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", counting)
    monkeypatch.setattr(build_local, "write_shard", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        built(tmp_path, runtime, 10, "cache")
    assert len(written) == 2
    monkeypatch.setattr(build_local, "write_shard", real_write)
    first_two = sum(encoded)
    encoded.clear()
    again = built(tmp_path, runtime, 10, "cache")
    assert again.store is not None
    shards = again.store.manifest.shards
    assert [s.name for s in shards[:2]] == written and len(shards) == 8
    assert sum(encoded) == sum(s.samples for s in shards[2:]) == len(again.store) - first_two


def test_a_torn_compressed_file_is_one_part_reported_once_as_bad_file(tmp_path: Path, runtime: Runtime) -> None:
    whole = gzip.compress("".join(json.dumps(rust_pair(i)) + "\n" for i in range(300)).encode())
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "torn.jsonl.gz").write_bytes(whole[: len(whole) * 3 // 4])
    served = built(tmp_path, runtime, 10, "cache", names=["local:gz"])
    assert served.store is not None
    assert len(served.store.manifest.shards) == 1  # it cannot seek: one part, however many records
    counters = served.store.manifest.sources[0]
    assert counters.malformed == {"bad_file": 1} and counters.kept == counters.read - 1 > 10
    assert served.store.row.tolist() == list(range(counters.kept))


def test_a_hugging_face_split_is_cut_by_row_and_each_part_reads_its_rows_only() -> None:
    datasets = pytest.importorskip("datasets")
    source = HfSource("hf:x", 1, "x", datasets.Dataset.from_list([{"text": f"t{i}"} for i in range(25)]),
                      slice_rows=4)
    plan = SourcePlan("hf:x", source.files, lambda: source, None, 10)  # type: ignore[arg-type]  # rules unread
    parts = source_parts(1, plan, source, "fp")
    assert [(p.start.row, p.end) for p in parts] == [(0, 10), (10, 20), (20, None)]
    assert [[r.row for r in PartRecords(source, p)] for p in parts] == [
        list(range(0, 10)), list(range(10, 20)), list(range(20, 25))]
    assert len({p.name for p in parts}) == 3 and parts[0].name != shard_name("fp", 1, "x")
