"""Hub datasets read in place from a local fake Hub (tests/fake_hub.py; HF_ENDPOINT points at it): `hf://` globs
and `owner/name` sources read the train split's data files where they are, in both modes, the same records and
epochs as the same files on disk, fetching no file they do not need, the first batch before the last file."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.server.pipeline.sources.opening import open_source
from sigil_feed.server.pipeline.sources.parquet import ParquetSource
from tests.conftest import batch_digest, write_config, write_jsonl
from tests.fake_hub import SHA, FakeHub

TRAIN_FILES = 3
ROWS = 200  # per train file


def code(i: int) -> dict[str, Any]:
    return {"content": f"pub fn f{i}() -> u32 {{ {i} }}\n// {'pad ' * (i % 13)}", "path": f"src/m{i}.rs",
            "stars": i}


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """acme/tiny: Parquet train files (several row groups), a test split and an unrelated large file, none of
    which a train source needs; acme/lines: JSONL train and validation files."""
    root = tmp_path_factory.mktemp("hub")
    tiny = root / "tiny"
    (tiny / "data").mkdir(parents=True)
    (tiny / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    for f in range(TRAIN_FILES):
        rows = [code(i) for i in range(f * ROWS, (f + 1) * ROWS)]
        pq.write_table(pa.Table.from_pylist(rows), tiny / f"data/train-0000{f}-of-0000{TRAIN_FILES}.parquet",
                       row_group_size=50)
    pq.write_table(pa.Table.from_pylist([code(-i) for i in range(1, 40)]), tiny / "data/test-00000-of-00001.parquet")
    (tiny / "other").mkdir()
    (tiny / "other/blob.bin").write_bytes(b"\0" * (1 << 20))
    lines = root / "lines"
    write_jsonl(lines / "train.jsonl", [code(i) for i in range(150)])
    write_jsonl(lines / "validation.jsonl", [code(-i) for i in range(1, 20)])
    return {"acme/tiny": tiny, "acme/lines": lines}


@pytest.fixture
def hub(repos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake Hub, online (whatever the environment says), HF_ENDPOINT pointing at it."""
    import huggingface_hub.constants

    with FakeHub(repos) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield fake


def values(spec: str, base_dir: Path) -> list[Any]:
    return [r.value for r in open_source(spec, 0, base_dir=base_dir)]


def test_a_hub_name_reads_its_train_files_in_place(hub: FakeHub, repos: dict[str, Path], tmp_path: Path) -> None:
    source = open_source("acme/tiny", 0, base_dir=tmp_path)
    assert isinstance(source, ParquetSource)
    assert source.files == [f"hf://datasets/acme/tiny@{SHA}/data/train-0000{f}-of-00003.parquet" for f in range(3)]
    assert [r.value for r in source] == values(f"parquet:{repos['acme/tiny']}/data/train-*.parquet", tmp_path)
    assert hub.downloaded() == {"acme/tiny/README.md",  # its card may name other data files (`configs:`)
                                *(f"acme/tiny/data/train-0000{f}-of-00003.parquet" for f in range(3))}
    size, sha256 = source.file_identities()[0]  # type: ignore[misc]
    local = repos["acme/tiny"] / "data/train-00000-of-00003.parquet"
    assert (sha256, size) == (_sha256(local), local.stat().st_size)

    lines = open_source("hf:acme/lines", 0, base_dir=tmp_path)
    assert lines.files == [f"hf://datasets/acme/lines@{SHA}/train.jsonl"]
    assert [r.value for r in lines] == values(f"local:{repos['acme/lines']}/train.jsonl", tmp_path)
    assert not any("validation" in path for path in hub.downloaded())


def test_an_hf_uri_glob_reads_the_files_it_names(hub: FakeHub, repos: dict[str, Path], tmp_path: Path) -> None:
    spec = "parquet:hf://datasets/acme/tiny/data/*.parquet"
    assert values(spec, tmp_path) == values(f"parquet:{repos['acme/tiny']}/data/*.parquet", tmp_path)
    assert "acme/tiny/other/blob.bin" not in hub.downloaded()
    one = open_source("parquet:hf://datasets/acme/tiny/data/train-00002-of-00003.parquet", 0, base_dir=tmp_path)
    one.set_state(one.part_starts(0, 50)[3])  # the last row group only
    assert [r.value for r in one] == [{k: v for k, v in code(i).items() if k != "stars"} for i in range(550, 600)]


def test_a_file_the_hub_refuses_is_a_bad_file_at_once_not_an_outage(
        hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A gated file (HTTP 403) is the Hub's answer, not an outage: before, it was retried for the whole storage
    window and then raised as unavailable, which a client takes as a reason to reconnect for ever."""
    monkeypatch.setenv("SIGIL_FEED_STORAGE_RETRY_S", "30")
    hub.denied.add("acme/lines/train.jsonl")
    started = time.monotonic()
    records = list(open_source("local:hf://datasets/acme/lines/train.jsonl", 0, base_dir=tmp_path))
    assert time.monotonic() - started < 10
    assert [r.error for r in records] == ["bad_file"]
    assert "HTTP 403" in caplog.text


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- served ---------------------------------------------------------------------------------------


def section(names: list[str], cache: Path, use_cache: bool, **extra: Any) -> dict[str, Any]:
    return {"names": names, "use_cache": use_cache, "cache_dir": str(cache), "shuffle_seed": 2, "remainder": "keep",
            "epochs": 1, "min_length": 8, "tokenizer_backend": "hf", "exclude_tests": False, **extra}


def epoch(target: str, dataset: str) -> list[str]:
    return [batch_digest(batch) for batch in FeedDataset(target, dataset, batch_size=8)]


def test_a_hub_dataset_serves_the_epochs_of_its_files_on_disk_in_both_modes_without_a_download(
        hub: FakeHub, repos: dict[str, Path], tmp_path: Path, start_server) -> None:
    """One server: `acme/tiny` and its train files on disk, streaming and cached. The streaming dataset's first
    batch comes before its last train file is read; no mode reads the test split or the unrelated file."""
    local = f"parquet:{repos['acme/tiny']}/data/train-*.parquet"
    datasets = {f"{where}-{mode}": {"dataset": section([spec], tmp_path / "cache", mode == "cached",
                                                       shuffle_block=64)}
                for where, spec in (("hub", "acme/tiny"), ("disk", local)) for mode in ("streaming", "cached")}
    del datasets["hub-cached"]  # started below, once the streaming dataset has served its first batch
    server = start_server(write_config(tmp_path / "c.yaml", None, max_seq_len=128, pack=False,
                                       server={"datasets": datasets}))
    last = f"acme/tiny/data/train-00002-of-0000{TRAIN_FILES}.parquet"
    first = next(iter(FeedDataset(server.target, "hub-streaming", batch_size=8)))
    assert first["input_ids"].shape[0] == 8 and last not in hub.downloaded(), hub.downloaded()
    assert epoch(server.target, "hub-streaming") == epoch(server.target, "disk-streaming")

    cached = start_server(write_config(tmp_path / "cached.yaml", section(["acme/tiny"], tmp_path / "cache", True,
                                                                           shuffle_block=64),
                                       max_seq_len=128, pack=False))
    assert epoch(cached.target, "default") == epoch(server.target, "disk-cached")
    needed = {"acme/tiny/README.md",
              *(f"acme/tiny/data/train-0000{f}-of-0000{TRAIN_FILES}.parquet" for f in range(TRAIN_FILES))}
    assert hub.downloaded() == needed
    assert not any("load_dataset" in line or "Downloading" in line for line in server.output + cached.output)
    json.dumps([r.__dict__ for r in hub.reads])  # the log is plain data
