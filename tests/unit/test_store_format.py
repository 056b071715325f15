"""Store format 2: filesystems (local and a real local S3 server), shard names, shards, the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sigil_feed.server.store.format import (
    MANIFEST,
    Manifest,
    ShardRows,
    StoreDamaged,
    StoreOutdated,
    TokenFacts,
    read_manifest,
    read_shard_facts,
    shard_complete,
    shard_name,
    shard_paths,
    shard_problem,
    store_dir,
    write_manifest,
    write_shard,
)
from sigil_feed.server.store.fs import resolve


def rows(lengths: list[int], start: int = 0, task: str | None = "completion") -> ShardRows:
    """Samples with ids start, start+1, ... and the given lengths."""
    n = sum(lengths)
    return ShardRows(ids=np.arange(start, start + n) % 1000, lengths=np.array(lengths),
                     prompt_tokens=np.ones(len(lengths)), file=np.zeros(len(lengths)),
                     row=np.arange(len(lengths)), task_type=[task] * len(lengths))


def manifest_for(shards: list, fingerprint: str = "f" * 16) -> Manifest:
    return Manifest(format=2, fingerprint=fingerprint, dtype="<u2", samples=sum(s.samples for s in shards),
                    tokens=sum(s.tokens for s in shards), created=1.0, dataset="d", shards=shards, sources=[],
                    tokenizer_fingerprint="t", token_facts=TokenFacts(vocab_size=1000, eos_id=1, pad_id=0))


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store root: a local folder, or a bucket on a real local S3 server."""
    if request.param == "local":
        return str(tmp_path / "stores")
    return request.getfixturevalue("s3_bucket") + "/stores"


def test_shard_names_derive_from_inputs() -> None:
    a = shard_name("fp", 0, ["/data/a.jsonl", 10, 5])
    assert a == shard_name("fp", 0, ["/data/a.jsonl", 10, 5])
    assert a.startswith("s000-") and len(a) == 21
    assert len({a, shard_name("fp", 1, ["/data/a.jsonl", 10, 5]), shard_name("fp2", 0, ["/data/a.jsonl", 10, 5]),
                shard_name("fp", 0, ["/data/a.jsonl", 11, 5]), shard_name("fp", 0, ["/data/a.jsonl", 10, 5], 1)}) == 5


def test_resolve_locations(tmp_path: Path) -> None:
    assert resolve(str(tmp_path)).is_local and resolve(str(tmp_path)).root == str(tmp_path)
    assert resolve(f"file://{tmp_path}").root == str(tmp_path)
    assert not resolve("s3://bucket/some/prefix").is_local
    assert resolve("s3://bucket/some/prefix/").root == "bucket/some/prefix"
    assert resolve("s3://bucket/p").uri("bucket/p/x") == "s3://bucket/p/x"


def test_shard_and_manifest_round_trip(location: str) -> None:
    fs = resolve(location)
    store = store_dir(fs, "f" * 16)
    first = write_shard(fs, store, shard_name("f", 0, "a"), [rows([3, 2]), rows([4], 5)], source=0, dtype="<u2")
    second = write_shard(fs, store, shard_name("f", 1, "b"), [rows([1], task=None)], source=1, dtype="<u2")
    assert (first.samples, first.tokens, first.tokens_file.size) == (3, 9, 18)
    assert read_shard_facts(fs, store, first.name) == first
    assert shard_complete(fs, store, first) and shard_complete(fs, store, second)
    with pytest.raises(StoreDamaged, match="missing"):
        read_manifest(fs, store)  # not committed yet: no manifest
    write_manifest(fs, store, manifest_for([first, second]))
    manifest = read_manifest(fs, store, "f" * 16)
    assert [s.name for s in manifest.shards] == [first.name, second.name]
    assert manifest.samples == 4 and manifest.tokens == 10 and manifest.bytes > 18
    tokens = np.frombuffer(fs.read_bytes(shard_paths(store, first.name)[0]), dtype="<u2")
    assert tokens.tolist() == list(range(9))
    with pytest.raises(StoreDamaged, match="does not match"):
        read_manifest(fs, store, "0" * 16)


def test_a_changed_or_truncated_shard_is_not_complete(location: str) -> None:
    fs = resolve(location)
    store = store_dir(fs, "f" * 16)
    facts = write_shard(fs, store, shard_name("f", 0, "a"), [rows([3, 2])], source=0, dtype="<u2")
    tokens_path = shard_paths(store, facts.name)[0]
    data = bytearray(fs.read_bytes(tokens_path))
    data[0] ^= 1
    fs.write_bytes(tokens_path, bytes(data))
    assert "checksum mismatch" in (shard_problem(fs, store, facts) or "")
    assert shard_complete(fs, store, facts, verify=False)  # same size: only the checksum tells
    fs.write_bytes(tokens_path, bytes(data[:-2]))
    assert "truncated" in (shard_problem(fs, store, facts, verify=False) or "")
    fs.delete(shard_paths(store, facts.name)[1])
    assert not shard_complete(fs, store, facts, verify=False)


def test_manifest_counts_must_agree_with_the_shards(tmp_path: Path) -> None:
    fs = resolve(tmp_path)
    store = store_dir(fs, "f" * 16)
    facts = write_shard(fs, store, shard_name("f", 0, "a"), [rows([3])], source=0, dtype="<u2")
    bad = manifest_for([facts]).model_dump(mode="json") | {"tokens": 99}
    fs.write_bytes(f"{store}/{MANIFEST}", __import__("json").dumps(bad).encode())
    with pytest.raises(StoreDamaged, match="do not sum"):
        read_manifest(fs, store)


def test_format_1_is_outdated(tmp_path: Path) -> None:
    fs = resolve(tmp_path)
    fs.write_bytes(fs.path("fp", MANIFEST), b'{"format": 1}')
    with pytest.raises(StoreOutdated, match="format 1"):
        read_manifest(fs, fs.path("fp"))


def test_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    fs = resolve(tmp_path)
    store = store_dir(fs, "f" * 16)

    def failing() -> list[ShardRows]:
        yield rows([2])
        raise RuntimeError("tokenizer died")

    with pytest.raises(RuntimeError):
        write_shard(fs, store, shard_name("f", 0, "a"), failing(), source=0, dtype="<u2")
    assert list((tmp_path / ("f" * 16) / "shards").iterdir()) == []
