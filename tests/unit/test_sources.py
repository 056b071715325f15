"""Sources: path expansion, JSONL/Parquet/HF reading, malformed records, and resume from any state."""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil_feed.server.config import load_config
from sigil_feed.server.errors import SourceError
from sigil_feed.server.feed.served import open_datasets
from sigil_feed.server.pipeline.samples import normalise
from sigil_feed.server.pipeline.sources.base import RawRecord, Source, SourceState
from sigil_feed.server.pipeline.sources.jsonl import SUFFIXES as jsonl_suffixes
from sigil_feed.server.pipeline.sources.opening import open_source
from sigil_feed.server.runtime import Runtime
from tests.conftest import write_compressed, write_config

PAIR = {"prompt": "fn f() {", "gen": "}", "_source": "synthetic", "_split": "train",
        "_task_type": "completion"}


def jsonl(rows: list[Any]) -> bytes:
    """JSON lines for a list of values."""
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def write_parquet(path: Path, rows: list[dict[str, Any]], group_rows: int = 4) -> Path:
    """A Parquet file with several row groups."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group_rows)
    return path


def read(spec: str, base_dir: Path, **kwargs: Any) -> list[RawRecord]:
    """Every record of a source."""
    return list(open_source(spec, 0, base_dir=base_dir, **kwargs))


def values(records: list[RawRecord]) -> list[Any]:
    """The values of records (None for malformed ones)."""
    return [r.value for r in records]


def check_resume(make: Callable[[], Source]) -> list[RawRecord]:
    """Resuming from the state at every position yields exactly the rest of a full read."""
    source = make()
    states, records = [source.get_state()], []
    for record in source:
        records.append(record)
        states.append(SourceState.model_validate_json(source.get_state().model_dump_json()))
    for k, state in enumerate(states):
        resumed = make()
        resumed.set_state(state)
        assert list(resumed) == records[k:], (k, state)
    source.set_state(states[0])
    assert list(source) == records
    return records


# --- path expansion -------------------------------------------------------------------------------


def test_file_directory_and_glob_expand_sorted(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl.zst", "c.jsonl.gz", "notes.txt", "sub/d.jsonl"):
        write_compressed(tmp_path / "data" / name, jsonl([{"text": name}]))
    data = tmp_path / "data"
    assert open_source(f"local:{data / 'b.jsonl'}", 0, base_dir=tmp_path).files == [str(data / "b.jsonl")]
    assert open_source(f"local:{data}", 0, base_dir=tmp_path).files == [
        str(data / n) for n in ("a.jsonl.zst", "b.jsonl", "c.jsonl.gz")]
    assert open_source(f"local:{data}/**/*.jsonl", 0, base_dir=tmp_path).files == [
        str(data / "b.jsonl"), str(data / "sub/d.jsonl")]
    names = ("a.jsonl.zst", "b.jsonl", "c.jsonl.gz")
    assert values(read(f"local:{data}", tmp_path)) == [{"text": n} for n in names]


@pytest.mark.parametrize("pattern", ["/**/*.jsonl", "/*", "", "/**"])
def test_folder_link_loops_read_each_real_file_once(tmp_path: Path, pattern: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "dir"
    write_compressed(data / "a.jsonl", jsonl([{"text": "a1"}, {"text": "a2"}]))
    write_compressed(data / "sub" / "b.jsonl", jsonl([{"text": "b"}]))
    (data / "self").symlink_to(".")
    (data / "sub" / "up").symlink_to("..")
    (data / "alias.jsonl").symlink_to("a.jsonl")
    spec = f"local:{data}{pattern}"
    with caplog.at_level(logging.WARNING):
        first = open_source(spec, 0, base_dir=tmp_path)
        second = open_source(spec, 0, base_dir=tmp_path)
    expected = [str(data / "a.jsonl")] + ([str(data / "sub" / "b.jsonl")] if pattern else [])
    assert first.files == second.files == expected
    assert first.file_identities() == second.file_identities()  # the fingerprint's part is stable
    assert sorted(r.value["text"] for r in first if r.value) == ["a1", "a2", "b"][:len(expected) + 1]
    skipped = [r.getMessage() for r in caplog.records if "skipping link" in r.getMessage()]
    assert len(skipped) == len(set(skipped))  # each link logged once, however often the source is opened
    if pattern:
        assert any(f"{data / 'self'} -> {data}" in m and "back into the listed tree" in m for m in skipped)
    assert any(f"{data / 'alias.jsonl'} -> {data / 'a.jsonl'}" in m for m in skipped)


@pytest.mark.parametrize("pattern", ["/**/*.jsonl", "/*", "/**"])
def test_link_cycles_and_dangling_links_are_skipped_and_logged(tmp_path: Path, pattern: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "dir"
    write_compressed(data / "a.jsonl", jsonl([{"text": "a"}]))
    (data / "ping.jsonl").symlink_to("pong.jsonl")  # two links pointing at each other
    (data / "pong.jsonl").symlink_to("ping.jsonl")
    (data / "me").symlink_to("me")  # a link to itself
    (data / "gone.jsonl").symlink_to("nothing.jsonl")
    with caplog.at_level(logging.WARNING):
        source = open_source(f"local:{data}{pattern}", 0, base_dir=tmp_path)
    assert source.files == [str(data / "a.jsonl")]
    skipped = " ".join(r.getMessage() for r in caplog.records if "skipping link" in r.getMessage())
    assert all(str(data / name) in skipped for name in ("ping.jsonl", "pong.jsonl", "gone.jsonl"))
    assert "a loop of links" in skipped


def test_folder_link_out_of_the_tree_is_followed_once(tmp_path: Path) -> None:
    write_compressed(tmp_path / "outside" / "o.jsonl", jsonl([{"text": "o"}]))
    data = tmp_path / "dir"
    write_compressed(data / "a.jsonl", jsonl([{"text": "a"}]))
    for name in ("link1", "link2"):  # two links to one folder: the first by name is listed
        (data / name).symlink_to(tmp_path / "outside")
    (tmp_path / "outside" / "back").symlink_to(data)  # a loop through the outside folder
    for pattern in ("/**/*.jsonl", "/*"):
        assert open_source(f"local:{data}{pattern}", 0, base_dir=tmp_path).files == [
            str(data / "a.jsonl"), str(data / "link1" / "o.jsonl")]


def test_glob_matches_like_glob_module(tmp_path: Path) -> None:
    for name in ("a.jsonl", "x/b.jsonl", "x/y/c.jsonl", "x/y/z/d.jsonl", ".hidden/e.jsonl", "x/.f.jsonl",
                 "x/y/notes.txt", "w1/g.jsonl", "w2/h.jsonl.gz"):
        write_compressed(tmp_path / name, jsonl([{"text": name}]))
    for pattern in ("**/*.jsonl", "*/*.jsonl", "x/**", "x/*/*.jsonl", "w[12]/*", "w?", "x/**/y/*", "**/z/*.jsonl"):
        want = sorted({str(p) for m in glob.glob(str(tmp_path / pattern), recursive=True)
                       for p in ([q for q in Path(m).iterdir() if q.name.endswith(jsonl_suffixes) and q.is_file()]
                                 if Path(m).is_dir() else [Path(m)])})
        assert open_source(f"local:{tmp_path}/{pattern}", 0, base_dir=tmp_path).files == want, pattern


def test_parquet_directory_lists_only_parquet(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "b.parquet", [{"text": "b"}])
    write_parquet(tmp_path / "d" / "a.parquet", [{"text": "a"}])
    write_compressed(tmp_path / "d" / "x.jsonl", jsonl([{"text": "x"}]))
    assert values(read(f"parquet:{tmp_path / 'd'}", tmp_path)) == [{"text": "a"}, {"text": "b"}]


def test_relative_path_tries_cwd_then_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, base = tmp_path / "cwd", tmp_path / "base"
    write_compressed(cwd / "d.jsonl", jsonl([{"text": "cwd"}]))
    write_compressed(base / "d.jsonl", jsonl([{"text": "base"}]))
    write_compressed(base / "only.jsonl", jsonl([{"text": "only-base"}]))
    monkeypatch.chdir(cwd)
    assert values(read("local:d.jsonl", base)) == [{"text": "cwd"}]
    assert values(read("local:only.jsonl", base)) == [{"text": "only-base"}]


@pytest.mark.parametrize("spec", ["local:missing.jsonl", "parquet:missing/*.parquet", "local:empty"])
def test_missing_path_fails_naming_spec_and_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  spec: str) -> None:
    (tmp_path / "base" / "empty").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError) as info:
        open_source(spec, 0, base_dir=tmp_path / "base")
    message = str(info.value)
    path = spec.partition(":")[2]
    assert spec in message and str(tmp_path / path) in message and str(tmp_path / "base" / path) in message


@pytest.mark.parametrize("spec", ["s3:bucket/key", "hf:", "local:"])
def test_bad_spec_fails(tmp_path: Path, spec: str) -> None:
    with pytest.raises(SourceError, match=r"local:PATH|no path"):
        open_source(spec, 0, base_dir=tmp_path)


# --- JSONL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_compressed_files_read_like_plain(tmp_path: Path, suffix: str) -> None:
    rows = [{"text": f"row {i}", "path": f"src/{i}.rs"} for i in range(50)]
    path = write_compressed(tmp_path / f"d{suffix}", jsonl(rows))
    records = read(f"local:{path}", tmp_path)
    assert values(records) == rows
    assert [(r.source, r.file, r.row) for r in records] == [(0, 0, i) for i in range(50)]
    assert records[3].location == f"{path}:4"


def test_zstd_with_several_frames(tmp_path: Path) -> None:
    frames = b"".join(zstandard.ZstdCompressor().compress(jsonl([{"text": str(i)}])) for i in range(3))
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(frames)
    assert values(read(f"local:{path}", tmp_path)) == [{"text": "0"}, {"text": "1"}, {"text": "2"}]


def test_malformed_lines_and_blank_lines(tmp_path: Path) -> None:
    lines = [
        b'{"text": "ok"}',
        b"",
        b"   \t\r",
        b'{"text": "trunc',
        b'{"text": "caf\xe9"}',
        b"[1, 2]",
        b"42",
        b"\xef\xbb\xbf" + b'{"text": "bom"}',
        b"[" * 100_000,
        b'{"a": ' * 10_000 + b"1" + b"}" * 10_000,  # valid JSON, nested deeper than json can parse
        b'{"text": "last, no newline"}',
    ]
    path = write_compressed(tmp_path / "d.jsonl", b"\n".join(lines))
    records = read(f"local:{path}", tmp_path)
    got = [(r.row, r.location, r.value, r.error) for r in records]
    assert got == [
        (0, f"{path}:1", {"text": "ok"}, None),
        (3, f"{path}:4", None, "bad_json"),
        (4, f"{path}:5", None, "bad_utf8"),
        (5, f"{path}:6", None, "bad_type"),
        (6, f"{path}:7", None, "bad_type"),
        (7, f"{path}:8", {"text": "bom"}, None),
        (8, f"{path}:9", None, "too_deep"),
        (9, f"{path}:10", None, "too_deep"),
        (10, f"{path}:11", {"text": "last, no newline"}, None),
    ]


def test_empty_file_yields_nothing(tmp_path: Path) -> None:
    write_compressed(tmp_path / "a.jsonl", b"")
    write_compressed(tmp_path / "b.jsonl", b"\n\n")
    source = open_source(f"local:{tmp_path}", 0, base_dir=tmp_path)
    assert list(source) == []
    with pytest.raises(StopIteration):
        next(source)


def test_single_50_mb_line(tmp_path: Path) -> None:
    big = "x" * 50_000_000
    path = tmp_path / "big.jsonl"
    with path.open("wb") as out:
        out.write(b'{"text": "small"}\n{"text": "')
        out.write(big.encode())
        out.write(b'"}\n{"text": "after"}\n')
    records = read(f"local:{path}", tmp_path)
    assert [len(r.value["text"]) for r in records if r.value] == [5, 50_000_000, 5]


def test_unreadable_and_corrupt_files_become_one_bad_file_record(tmp_path: Path) -> None:
    write_compressed(tmp_path / "a.jsonl", jsonl([{"text": "a"}]))
    write_compressed(tmp_path / "b.jsonl", jsonl([{"text": "b"}]))
    truncated = gzip.compress(jsonl([{"text": str(i) * 100} for i in range(2000)]))
    (tmp_path / "c.jsonl.gz").write_bytes(truncated[: len(truncated) // 2])
    (tmp_path / "d.jsonl.zst").write_bytes(b"not zstd at all")
    write_compressed(tmp_path / "e.jsonl", jsonl([{"text": "e"}]))
    source = open_source(f"local:{tmp_path}", 0, base_dir=tmp_path)
    (tmp_path / "b.jsonl").unlink()
    records = list(source)
    bad = [(r.file, r.error) for r in records if r.value is None]
    assert bad == [(1, "bad_file"), (2, "bad_file"), (3, "bad_file")]
    assert records[0].value == {"text": "a"} and records[-1].value == {"text": "e"}
    assert records[1].row == 0 and records[-2].row == 0  # b and d fail at the start
    c_rows = [r.row for r in records if r.file == 2]
    assert c_rows == list(range(len(c_rows))) and len(c_rows) > 1


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    """JSONL bytes of 2,000 and 20,000 records."""
    return {n: jsonl([{"text": f"record {i} " + "x" * (i % 50)} for i in range(n)]) for n in (2_000, 20_000)}


@pytest.mark.parametrize("records", [2_000, 20_000])
@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_file_is_bad_file_after_its_last_good_line(
        tmp_path: Path, big_files: dict[int, bytes], records: int, cut: float, suffix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    whole = write_compressed(tmp_path / f"whole{suffix}", big_files[records]).read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole[: int(len(whole) * cut)])
    source = open_source(f"local:{tmp_path}/cut*", 0, base_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        got = list(source)
    good = len(got) - 1
    assert [r.value for r in got[:good]] == [{"text": f"record {i} " + "x" * (i % 50)} for i in range(good)]
    # the torn line is no bad_json: the file ends with one bad_file record
    assert (got[-1].row, got[-1].location, got[-1].error) == (good, f"{path}:{good + 1}", "bad_file")
    assert any(f"cannot read {path} after line {good}, its last good line" in r.getMessage() for r in caplog.records)
    source.set_state(SourceState(file=0, row=good))  # a cursor at the tear resumes to the same verdict
    assert [r.error for r in source] == ["bad_file"]


def test_lone_surrogate_in_jsonl_is_read_and_normalised_to_bad_utf8(tmp_path: Path) -> None:
    lines = [b'{"text": "bad \\ud800 text"}', b'{"prompt": "p", "gen": "\\udfff"}', b'{"text": "ok \\ud83d\\ude00"}']
    path = write_compressed(tmp_path / "s.jsonl.zst", b"\n".join(lines))
    got = [(r.location, normalise(r)) for r in read(f"local:{path}", tmp_path)]
    assert [(loc, s if isinstance(s, str) else s.text) for loc, s in got] == [
        (f"{path}:1", "bad_utf8"), (f"{path}:2", "bad_utf8"), (f"{path}:3", "ok \U0001f600")]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_resume_from_every_state(tmp_path: Path, suffix: str) -> None:
    write_compressed(tmp_path / f"a{suffix}", jsonl([{"text": str(i)} for i in range(5)]) + b"\n\nnot json\n")
    write_compressed(tmp_path / f"b{suffix}", b"")
    write_compressed(tmp_path / f"c{suffix}", b"\n" + jsonl([[1], {"text": "c"}]))
    records = check_resume(lambda: open_source(f"local:{tmp_path}", 3, base_dir=tmp_path))
    ids = [(3, 0, i) for i in range(5)] + [(3, 0, 7), (3, 2, 1), (3, 2, 2)]
    assert [(r.source, r.file, r.row) for r in records] == ids


def test_plain_state_has_offset_and_row_alone_also_resumes(tmp_path: Path) -> None:
    path = write_compressed(tmp_path / "a.jsonl", jsonl([{"text": str(i)} for i in range(10)]))
    source = open_source(f"local:{path}", 0, base_dir=tmp_path)
    first = [next(source) for _ in range(4)]
    assert source.get_state() == SourceState(file=0, row=4, offset=sum(len(jsonl([r.value])) for r in first))
    rest = list(source)
    source.set_state(SourceState(file=0, row=4))
    assert source.get_state() == SourceState(file=0, row=4)
    assert list(source) == rest
    source.restart()
    assert list(source) == first + rest


LINES = st.one_of(
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=10), max_size=3).map(
        lambda d: json.dumps(d, ensure_ascii=False).encode()),
    st.sampled_from([b"", b" ", b"\t\r", b"[]", b"null", b'{"a":', b"\xff\xfe"]),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
)


@settings(max_examples=60, deadline=None)
@given(files=st.lists(st.tuples(st.lists(LINES, max_size=8), st.booleans()), min_size=1, max_size=3),
       suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".jsonl.zst"]))
def test_jsonl_property_rows_and_resume(files: list[tuple[list[bytes], bool]], suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        expected_rows = []
        for i, (lines, trailing_newline) in enumerate(files):
            data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
            write_compressed(root / f"{i:02d}{suffix}", data)
            expected_rows += [(i, row) for row, line in enumerate(io.BytesIO(data)) if not line.isspace()]
        records = check_resume(lambda: open_source(f"local:{root}", 0, base_dir=root))
        assert [(r.file, r.row) for r in records] == expected_rows
        assert all((r.value is None) == (r.error is not None) for r in records)


# --- Parquet --------------------------------------------------------------------------------------


def test_parquet_reads_only_needed_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{**PAIR, "prompt": f"p{i}", "blob": "z" * 10_000, "n": i} for i in range(10)]
    path = write_parquet(tmp_path / "a.parquet", rows, group_rows=3)
    asked: list[list[str]] = []
    original = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs["columns"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    records = read(f"parquet:{path}", tmp_path)
    assert values(records) == [{**PAIR, "prompt": f"p{i}"} for i in range(10)]
    assert asked and all(cols == ["prompt", "gen", "_source", "_split", "_task_type"] for cols in asked)
    assert records[4].location == f"{path} row-group 1 row 4"
    assert [r.row for r in records] == list(range(10))


def test_parquet_nulls_are_missing_keys_and_no_needed_column_gives_empty_records(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", [{**PAIR, "text": None}, {**dict.fromkeys(PAIR), "text": "t"}])
    write_parquet(tmp_path / "b.parquet", [{"other": 1}, {"other": 2}])
    assert values(read(f"parquet:{tmp_path}", tmp_path)) == [PAIR, {"text": "t"}, {}, {}]


@pytest.mark.parametrize("corrupt", [b"random bytes, not parquet" * 10, None])
def test_corrupt_parquet_is_one_bad_file_record(tmp_path: Path, corrupt: bytes | None) -> None:
    write_parquet(tmp_path / "a.parquet", [{"text": "a"}])
    good = write_parquet(tmp_path / "b.parquet", [{"text": str(i)} for i in range(10)]).read_bytes()
    (tmp_path / "b.parquet").write_bytes(corrupt or good[: len(good) - 20])
    write_parquet(tmp_path / "c.parquet", [{"text": "c"}])
    records = read(f"parquet:{tmp_path}", tmp_path)
    assert [(r.file, r.row, r.value, r.error) for r in records] == [
        (0, 0, {"text": "a"}, None), (1, 0, None, "bad_file"), (2, 0, {"text": "c"}, None)]


def invalid_utf8_table() -> pa.Table:
    """A table whose `text` column holds invalid UTF-8 in row 1 (Arrow does not check it on write)."""
    values = [b"fine", b"caf\xe9", b"also fine"]
    offsets = pa.array([0, 4, 8, 17], pa.int32()).buffers()[1]
    text = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"".join(values))])
    return pa.table({"text": text, "path": ["a.rs", "b.rs", "c.rs"]})


def test_parquet_invalid_utf8_is_one_bad_utf8_record(tmp_path: Path) -> None:
    pq.write_table(invalid_utf8_table(), tmp_path / "a.parquet")
    records = read(f"parquet:{tmp_path}", tmp_path)
    assert [normalise(r) if r.row == 1 else r.value for r in records] == [
        {"text": "fine", "path": "a.rs"}, "bad_utf8", {"text": "also fine", "path": "c.rs"}]


def test_parquet_resume_from_every_state(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", [{"text": str(i)} for i in range(11)], group_rows=4)
    write_parquet(tmp_path / "b.parquet", [{"content": "x", "path": "p"}], group_rows=4)
    (tmp_path / "c.parquet").write_bytes(b"broken")
    write_parquet(tmp_path / "d.parquet", [{"text": str(i)} for i in range(5)], group_rows=2)
    check_resume(lambda: open_source(f"parquet:{tmp_path}", 0, base_dir=tmp_path))
    source = open_source(f"parquet:{tmp_path}", 0, base_dir=tmp_path)
    source.batch_rows = 3  # type: ignore[attr-defined]  # batches that straddle the resume row
    source.set_state(SourceState(file=0, row=9))
    assert [r.value for r in source][:3] == [{"text": "9"}, {"text": "10"}, {"content": "x", "path": "p"}]


# --- Hugging Face ---------------------------------------------------------------------------------

HF_ROWS = [{"content": f"fn f{i}() {{}}", "max_stars_repo_path": f"src/{i}.rs", "size": i} for i in range(7)]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network for datasets or huggingface_hub, whatever the environment says."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def expected_hf(name: str) -> list[RawRecord]:
    """The records HF_ROWS read as source 0 named `name`."""
    return [RawRecord(0, 0, i, f"{name}[{i}]", {k: v for k, v in row.items() if k != "size"})
            for i, row in enumerate(HF_ROWS)]


def test_hf_save_to_disk_directory(tmp_path: Path, offline: None) -> None:
    import datasets

    datasets.Dataset.from_list(HF_ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(HF_ROWS)}).save_to_disk(str(tmp_path / "dict"))
    assert read(f"hf:{tmp_path / 'saved'}", tmp_path) == expected_hf(str(tmp_path / "saved"))
    assert read("dict", tmp_path) == expected_hf("dict")  # relative to base_dir

    def sliced() -> Source:
        source = open_source("saved", 0, base_dir=tmp_path)
        source.slice_rows = 3  # type: ignore[attr-defined]  # slices that straddle the resume row
        return source

    check_resume(sliced)


def test_hf_invalid_utf8_is_one_bad_utf8_record(tmp_path: Path, offline: None) -> None:
    import datasets

    datasets.Dataset(invalid_utf8_table()).save_to_disk(str(tmp_path / "saved"))
    records = read(str(tmp_path / "saved"), tmp_path)
    assert [normalise(r) if r.row == 1 else r.value for r in records] == [
        {"text": "fine", "path": "a.rs"}, "bad_utf8", {"text": "also fine", "path": "c.rs"}]


def test_hf_without_needed_columns_yields_empty_records(tmp_path: Path, offline: None) -> None:
    import datasets

    datasets.Dataset.from_list([{"other": 1}, {"other": 2}]).save_to_disk(str(tmp_path / "other"))
    assert values(read(str(tmp_path / "other"), tmp_path)) == [{}, {}]


def test_hf_directory_of_data_files(tmp_path: Path, offline: None) -> None:
    write_compressed(tmp_path / "files" / "train.jsonl", jsonl(HF_ROWS))
    assert read(str(tmp_path / "files"), tmp_path, cache_dir=str(tmp_path / "cache")) == expected_hf(
        str(tmp_path / "files"))


def make_hub_cache(cache: Path, owner: str, name: str, tmp_path: Path) -> None:
    """Lay out a Hub dataset in a datasets cache, as a download would have left it."""
    import datasets

    write_parquet(tmp_path / "hub-src.parquet", HF_ROWS)
    datasets.load_dataset("parquet", data_files=str(tmp_path / "hub-src.parquet"), split="train",
                          cache_dir=str(cache))
    built = next((cache / "parquet").glob("*/0.0.0/*/parquet-train.arrow")).parent
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / built.name
    shutil.copytree(built, target)
    (target / "parquet-train.arrow").rename(target / f"{name}-train.arrow")


def test_hf_hub_name_from_offline_cache(tmp_path: Path, offline: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    cache = tmp_path / "hf-cache"
    make_hub_cache(cache, "acme", "rust-tiny", tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read("acme/rust-tiny", elsewhere, cache_dir=str(cache)) == expected_hf("acme/rust-tiny")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    source = open_source("hf:acme/rust-tiny", 2, base_dir=elsewhere)
    assert source.files == ["acme/rust-tiny"]
    assert [r.value for r in source] == [r.value for r in expected_hf("acme/rust-tiny")]
    check_resume(lambda: open_source("hf:acme/rust-tiny", 2, base_dir=elsewhere))


def test_hf_unknown_name_fails_at_open_with_hint(tmp_path: Path, offline: None) -> None:
    with pytest.raises(SourceError, match=r"acme/absent.*HF_DATASETS_CACHE / cache_dir.*HF_HUB_OFFLINE=0"):
        open_source("acme/absent", 0, base_dir=tmp_path, cache_dir=str(tmp_path / "empty-cache"))


def test_null_text_is_missing_fields_in_every_source(tmp_path: Path, offline: None) -> None:
    import datasets

    write_compressed(tmp_path / "n.jsonl", b'{"text": null}\n')
    table = pa.table({"text": pa.array([None], pa.string())})
    pq.write_table(table, tmp_path / "n.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    for spec in (f"local:{tmp_path / 'n.jsonl'}", f"parquet:{tmp_path / 'n.parquet'}", str(tmp_path / "hf")):
        assert [normalise(r) for r in read(spec, tmp_path)] == ["missing_fields"], spec


def test_a_served_dataset_keeps_the_files_it_found_at_start(tmp_path: Path, runtime: Runtime) -> None:
    """A file deleted while serving must not shift the others' indices (a cursor's (file, row, offset) would then
    point into another file): the sources keep the start's list, and the deleted file reads as a bad file."""
    for name in ("a", "b", "c"):
        write_compressed(tmp_path / "data" / f"{name}.jsonl", jsonl([{"text": f"{name}{i}"} for i in range(2)]))
    config = write_config(tmp_path / "c.yaml", {"names": ["local:data/*.jsonl"], "use_cache": False})
    dataset = open_datasets(load_config(config), runtime)["default"]
    (tmp_path / "data" / "a.jsonl").unlink()
    (source,) = dataset.mix().children
    assert [Path(f).name for f in source.source.files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert [(r.file, r.value["text"]) for r in source.source if r.value] == [(1, "b0"), (1, "b1"), (2, "c0"), (2, "c1")]
