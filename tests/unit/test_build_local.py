"""The local store builder: one shard per source file, a rerun writes only the shards that are not complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from sigil_feed.server.config import load_config
from sigil_feed.server.dataset import ServedDataset, open_datasets
from sigil_feed.server.store import build_local
from sigil_feed.server.store.format import MANIFEST, shard_paths
from tests.conftest import rust_pair, write_config, write_jsonl


def dataset(tmp_path: Path, location: str) -> ServedDataset:
    """A cached dataset of three files of ten pairs (written once: their mtimes are part of the fingerprint)."""
    config = tmp_path / "c.yaml"
    if not config.exists():
        for f in range(3):
            write_jsonl(tmp_path / "pairs" / f"p{f}.jsonl", [rust_pair(i) for i in range(f * 10, f * 10 + 10)])
        write_config(config, {"names": ["local:pairs"], "use_cache": True, "cache_dir": location})
    return open_datasets(load_config(config))["default"]


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "cache") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/cache"


def test_a_rerun_writes_only_the_shards_that_are_not_complete(tmp_path: Path, location: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = build_local.write_shard

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        written.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(build_local, "write_shard", counting)
    first = dataset(tmp_path, location)
    first.prepare(show_bar=False)
    assert first.store is not None and len(first.store) == 30 and len(written) == 3
    shards = first.store.manifest.shards
    fs, store = first.store_fs, first.store_dir
    fs.delete(f"{store}/{MANIFEST}")  # uncommitted, as after a crash before the manifest
    fs.delete(shard_paths(store, shards[1].name)[0])  # and one shard lost its tokens
    written.clear()
    again = dataset(tmp_path, location)
    again.prepare(show_bar=False)
    assert written == [shards[1].name]
    assert again.store is not None and again.store.manifest.shards == shards
    assert again.counters[0].read == 30 and again.counters[0].kept == 30  # accounting merged from every shard
    written.clear()
    warm = dataset(tmp_path, location)
    warm.prepare(show_bar=False)
    assert written == []  # a committed store is opened, not rebuilt
    assert warm.encoder._tokenizer is None  # a warm start needs no tokenizer: the manifest has its facts
