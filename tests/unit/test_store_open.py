"""Opening a store: the samples index written at commit is read in place of every shard's samples table (a few
requests whatever the shard count); a store without one, or with one that is damaged or not its shards', opens
the same from the shards' tables."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest
from fsspec.implementations.local import LocalFileSystem

from bench.store_open import FINGERPRINT, make_store
from sigil_feed.server.store import reader
from sigil_feed.server.store.format import MANIFEST, SAMPLES_INDEX, read_manifest, shard_paths
from sigil_feed.server.store.fs import StoreFS, resolve
from sigil_feed.server.store.reader import TokenStore, open_store
from tests.unit.test_store import FP
from tests.unit.test_store import make_store as make_small_store

SHARDS, SAMPLES = 40, 16


class CountingFS(LocalFileSystem):
    """A local filesystem that counts the files opened and the metadata asked for (each a request on S3)."""

    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        self.requests.append(f"open {path}")
        return super()._open(path, mode, **kwargs)

    def info(self, path: str, **kwargs: Any) -> Any:
        self.requests.append(f"info {path}")
        return super().info(path, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self.requests.append(f"ls {path}")
        return super().ls(path, detail=detail, **kwargs)


def remote(fs: StoreFS, counting: CountingFS | None = None) -> StoreFS:
    """The same files through a pyarrow filesystem that is not LocalFileSystem: a remote store."""
    return StoreFS(pafs.PyFileSystem(pafs.FSSpecHandler(counting or LocalFileSystem())), fs.root, "remote://" + fs.root)


def columns(store: TokenStore) -> dict[str, Any]:
    return {name: getattr(store, name).tolist() for name in ("shard", "offsets", "lengths", "prompt_tokens", "source",
                                                             "file", "row", "task")} | {"tasks": store.task_types}


def without_index(path: str) -> None:
    """Commit the store's manifest again without its samples index (as stores committed before it were)."""
    manifest = read_manifest(resolve(path), path)
    Path(path, MANIFEST).write_text(manifest.model_copy(update={"samples_index": None}).model_dump_json())


@pytest.fixture
def store(tmp_path: Path) -> tuple[StoreFS, str]:
    fs = resolve(tmp_path / "stores")
    return fs, make_store(fs, SHARDS, SAMPLES)


def test_a_remote_store_opens_with_a_few_requests_whatever_its_shards(store: tuple[StoreFS, str]) -> None:
    fs, path = store
    counting = CountingFS()
    opened = open_store(remote(fs, counting), path, FINGERPRINT)
    assert len(opened) == SHARDS * SAMPLES and opened.manifest.samples_index is not None
    assert opened.samples_bytes_read == opened.manifest.samples_index.file.size
    assert not [r for r in counting.requests if "/shards/" in r]  # nothing per shard
    assert len(counting.requests) <= 6, counting.requests  # the manifest and the index (a stat and a read each)


def test_a_store_without_an_index_opens_alike_from_its_shards_tables(store: tuple[StoreFS, str]) -> None:
    fs, path = store
    indexed = columns(open_store(remote(fs), path, FINGERPRINT))
    without_index(path)
    counting = CountingFS()
    opened = open_store(remote(fs, counting), path, FINGERPRINT)
    assert columns(opened) == indexed
    assert opened.samples_bytes_read == sum(s.samples_file.size for s in opened.manifest.shards)
    assert len([r for r in counting.requests if r.startswith("open") and "/shards/" in r]) == SHARDS


def test_tasks_offsets_and_shards_match_the_shards_tables(tmp_path: Path) -> None:
    fs, path = make_small_store(tmp_path)
    indexed = columns(open_store(fs, path, FP))
    without_index(path)
    assert columns(open_store(fs, path, FP)) == indexed
    assert indexed["tasks"] == ["completion"] and indexed["task"] == [0, -1, 0] and indexed["offsets"] == [0, 3, 0]


@pytest.mark.parametrize("damage", ["flip", "delete", "other shards"])
def test_a_damaged_or_foreign_index_is_passed_over_with_a_warning(store: tuple[StoreFS, str], damage: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    fs, path = store
    indexed = columns(open_store(fs, path, FINGERPRINT))
    index = Path(path, SAMPLES_INDEX)
    if damage == "flip":
        data = bytearray(index.read_bytes())
        data[len(data) // 2] ^= 0xFF
        index.write_bytes(bytes(data))
    elif damage == "delete":
        index.unlink()
    else:  # a shard's samples file changed after the index was written: the index is not this store's
        first = read_manifest(fs, path).shards[0]
        Path(shard_paths(path, first.name)[1]).write_bytes(Path(shard_paths(path, first.name)[1]).read_bytes())
        manifest = read_manifest(fs, path)
        changed = manifest.model_copy(update={"samples_index": manifest.samples_index.model_copy(  # type: ignore[union-attr]
            update={"shards": "0" * 16})})
        Path(path, MANIFEST).write_text(changed.model_dump_json())
    with caplog.at_level(logging.WARNING, logger="sigil_feed.server.store.reader"):
        opened = open_store(remote(fs), path, FINGERPRINT)
    assert columns(opened) == indexed
    assert "reading the shards' samples tables instead" in caplog.text


def test_a_large_index_is_read_in_ranges_at_once(store: tuple[StoreFS, str], monkeypatch: pytest.MonkeyPatch) -> None:
    fs, path = store
    indexed = columns(open_store(remote(fs), path, FINGERPRINT))
    monkeypatch.setattr(reader, "RANGE_BYTES", 500)
    ranged, read_ranges = [], reader._read_ranges
    monkeypatch.setattr(reader, "_read_ranges", lambda *args: ranged.append(args[2]) or read_ranges(*args))
    assert columns(open_store(remote(fs), path, FINGERPRINT)) == indexed
    assert ranged == [read_manifest(fs, path).samples_index.file.size] and ranged[0] > 4 * 500  # type: ignore[union-attr]


def test_the_index_holds_every_sample_in_store_order(store: tuple[StoreFS, str]) -> None:
    fs, path = store
    opened = open_store(fs, path, FINGERPRINT)
    assert np.array_equal(opened.shard, np.repeat(np.arange(SHARDS), SAMPLES))
    assert np.array_equal(opened.file, opened.shard) and np.array_equal(opened.row, np.tile(np.arange(SAMPLES), SHARDS))
    assert opened.manifest.bytes == opened.manifest.samples_index.file.size + sum(  # type: ignore[union-attr]
        s.tokens_file.size + s.samples_file.size for s in opened.manifest.shards)
