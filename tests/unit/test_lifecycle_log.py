"""The store lifecycle's log: a damaged store is reported once per start, however often it is opened."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from sigil_feed.server.builders.lifecycle import StoreLifecycle
from sigil_feed.server.store.format import Manifest, shard_paths
from sigil_feed.server.store.reader import open_store
from tests.unit.test_store import FP, make_store


def test_a_damaged_store_is_reported_once_per_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The attempt opens the store three times before it rebuilds (once, then in wait_or_build before and after
    taking the build lease): one WARNING saying why."""
    fs, path = make_store(tmp_path)
    first = open_store(fs, path, FP).manifest.shards[0]
    tokens = Path(shard_paths(path, first.name)[0])
    tokens.write_bytes(tokens.read_bytes()[:-2])
    builds: list[str] = []

    def rebuild(plans: list[Any], encoder: Any, **kwargs: Any) -> Manifest:
        builds.append(kwargs["store"])
        return open_store(*make_store(tmp_path), FP).manifest

    lifecycle = StoreLifecycle("d", fs, path, FP, encoder=None, plans=list,  # type: ignore[arg-type]
                               with_prompts=False, shard_cache=lambda: None)
    with caplog.at_level(logging.WARNING, logger="sigil_feed.server.builders.lifecycle"):
        lifecycle.prepare(lambda store: None, show_bar=False, build=rebuild)
    said = [r.getMessage() for r in caplog.records if "damaged, rebuilding" in r.getMessage()]
    assert len(said) == 1 and "missing or truncated" in said[0], said
    assert builds == [path] and lifecycle.progress.state == "ready" and len(lifecycle.store or []) == 3
