"""A store's identity is its sources' content: data that moves or is touched keeps its store, data that grows
builds only its new shards, and a store of grown data holds what a build from scratch holds."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sigil_feed.server.builders import local_engine as build_local
from sigil_feed.server.builders.changes import file_changes
from sigil_feed.server.config import load_config
from sigil_feed.server.feed.served import ServedDataset, open_datasets
from sigil_feed.server.pipeline.sources.identity import DigestCache, local_file_identities
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.store.format import InputFile, shard_paths
from tests.conftest import rust_pair, write_config, write_jsonl


def pairs(folder: Path, *names: int) -> None:
    """`folder/p{n}.jsonl` of ten pairs each (pairs 10n..10n+9)."""
    for n in names:
        write_jsonl(folder / f"p{n}.jsonl", [rust_pair(i) for i in range(10 * n, 10 * n + 10)])


def served(tmp_path: Path, data: Path, cache: str, runtime: Runtime) -> ServedDataset:
    config = write_config(tmp_path / f"{data.name}.yaml", {"names": [f"local:{data}/*.jsonl"], "use_cache": True,
                                                       "cache_dir": cache})
    dataset = open_datasets(load_config(config), runtime)["default"]
    dataset.prepare(show_bar=False)
    return dataset


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the shards tokenized (not those taken whole from another store)."""
    names: list[str] = []
    real = build_local.write_shard

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        names.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(build_local, "write_shard", counting)
    return names


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "cache") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/cache"


def test_a_digest_is_read_once_per_unchanged_file_and_again_when_it_changes(tmp_path: Path) -> None:
    cache = DigestCache(tmp_path / "digests.json")
    data = write_jsonl(tmp_path / "d.jsonl", [rust_pair(0)])
    first = cache.identities([str(data)])
    assert cache.identities([str(data)]) == first and cache.hashed == 1
    assert DigestCache(tmp_path / "digests.json").identities([str(data)]) == first  # the sidecar remembers it
    os.utime(data, (1, 1))
    assert cache.identities([str(data)]) == first and cache.hashed == 2  # touched: read again, same identity
    data.write_text(data.read_text().replace("item_0", "item_9"))  # same size, other bytes
    changed = cache.identities([str(data)])
    assert changed[0][0] == first[0][0] and changed != first


def test_a_file_rewritten_in_place_with_its_mtime_restored_gets_its_new_identity(tmp_path: Path) -> None:
    """Same size, same mtime, same inode (`cp` over it, then `touch -r`, or a tool that keeps times): the change
    time the kernel sets on every write still tells the file changed."""
    cache = DigestCache(tmp_path / "digests.json")
    data = write_jsonl(tmp_path / "d.jsonl", [rust_pair(0)])
    before = os.stat(data)
    first = cache.identities([str(data)])
    with open(data, "r+b") as f:  # in place: the inode stays
        changed = f.read().replace(b"item_0", b"item_9", 1)
        f.seek(0)
        f.write(changed)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(data)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert cache.identities([str(data)]) != first
    assert DigestCache(tmp_path / "digests.json").identities([str(data)]) != first  # nor from the sidecar


@pytest.mark.parametrize("sidecar", [
    "not json", "[1, 2]", '{"PATH": "text"}', '{"PATH": [1]}', '{"PATH": KEY}', '{"PATH": KEY_AND_NUMBER}',
    '{"PATH": KEY_AND_NULL}'])
def test_a_damaged_digest_sidecar_costs_a_hash_never_a_wrong_identity_or_a_failure(tmp_path: Path,
                                                                                  sidecar: str) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [rust_pair(0)])
    [want] = DigestCache(tmp_path / "fresh.json").identities([str(data)])
    real, stat = os.path.realpath(data), os.stat(data)
    key = json.dumps([stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns])
    (tmp_path / "digests.json").write_text(sidecar.replace("PATH", real).replace("KEY_AND_NUMBER", key[:-1] + ", 7]")
                                           .replace("KEY_AND_NULL", key[:-1] + ", null]").replace("KEY", key))
    cache = DigestCache(tmp_path / "digests.json")
    assert cache.identities([str(data)]) == [want]
    assert DigestCache(tmp_path / "digests.json").identities([str(data)]) == [want]  # the sidecar was mended


def test_data_copied_elsewhere_or_touched_keeps_its_store(tmp_path: Path, runtime: Runtime,
                                                          written: list[str]) -> None:
    pairs(tmp_path / "a", 0, 1, 2)
    cache = str(tmp_path / "cache")
    first = served(tmp_path, tmp_path / "a", cache, runtime)
    assert len(written) == 3
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for path in (tmp_path / "b").iterdir():
        os.utime(path, (12345, 12345))
    moved = served(tmp_path, tmp_path / "b", cache, runtime)
    assert (moved.content_fingerprint, moved.fingerprint) == (first.content_fingerprint, first.fingerprint)
    assert len(written) == 3 and moved.encoder._tokenizer is None  # opened, not built: no tokenizer loaded
    assert moved.counters[0].spec == f"local:{tmp_path / 'b'}/*.jsonl"  # stats name the source as configured now


def test_files_added_to_a_glob_build_only_their_shards_and_equal_a_build_from_scratch(
        tmp_path: Path, location: str, runtime: Runtime, written: list[str], caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    pairs(data, 0, 2, 4)
    first = served(tmp_path, data, location, runtime)
    assert first.store is not None and len(written) == 3
    pairs(data, 1, 6)  # p1 sorts between p0 and p2: the files after it change index
    written.clear()
    with caplog.at_level(logging.INFO):
        grown = served(tmp_path, data, location, runtime)
    assert grown.store is not None and grown.content_fingerprint != first.content_fingerprint
    assert len(written) == 2 and grown.fingerprint == first.fingerprint  # cursors stay valid across the growth
    assert any("added: " in r.message and "p1.jsonl" in r.message and "p6.jsonl" in r.message
               for r in caplog.records)
    assert any("2 written, 0 complete from before, 3 taken from the dataset's other stores" in r.message
               for r in caplog.records)
    if grown.lifecycle.fs.is_local:  # taken whole: the tokens are the same file, linked
        old = {s.name: os.stat(shard_paths(first.store_dir, s.name)[0]).st_ino for s in first.store.manifest.shards}
        new = {s.name: os.stat(shard_paths(grown.store_dir, s.name)[0]).st_ino for s in grown.store.manifest.shards}
        assert {name: ino for name, ino in new.items() if name in old} == old
    scratch = served(tmp_path, data, str(tmp_path / "scratch"), runtime)
    assert scratch.store is not None and scratch.content_fingerprint == grown.content_fingerprint
    for column in ("source", "file", "row", "lengths", "prompt_tokens", "shard", "offsets"):
        assert np.array_equal(getattr(grown.store, column), getattr(scratch.store, column)), column
    assert [s.name for s in grown.store.manifest.shards] == [s.name for s in scratch.store.manifest.shards]
    assert grown.store.manifest.sources == scratch.store.manifest.sources
    for a, b in zip(grown.store.manifest.shards, scratch.store.manifest.shards, strict=True):
        assert a.tokens_file == b.tokens_file and a.samples == b.samples


def test_the_log_names_files_changed_added_and_removed_but_not_files_that_moved() -> None:
    def files(*entries: tuple[str, str]) -> list[list[InputFile]]:
        return [[InputFile(path=path, identity=[1, digest]) for path, digest in entries]]

    old = files(("/a/x", "1"), ("/a/y", "2"), ("/a/z", "3"))
    assert file_changes(old, files(("/b/x", "1"), ("/b/y", "2"), ("/b/z", "3")), ["local:d"]) == []
    said = file_changes(old, files(("/a/x", "1"), ("/a/y", "9"), ("/a/w", "4")), ["local:d"])
    assert said == ["local:d: content changed: /a/y", "local:d: added: /a/w", "local:d: removed: /a/z"]


def test_identities_are_content_not_path(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [rust_pair(1)])
    b = tmp_path / "b.jsonl"
    shutil.copy(a, b)
    ids = local_file_identities([str(a), str(b), str(tmp_path / "missing.jsonl")])
    assert ids[0] == ids[1] == [a.stat().st_size, ids[0][1]]
    assert ids[2] == [str(tmp_path / "missing.jsonl")]
    assert json.loads(json.dumps(ids)) == ids
