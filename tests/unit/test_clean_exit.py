"""A process exits cleanly: no native thread is left holding a Python object when the interpreter finalizes (an
Arrow worker that drops one then cannot take the GIL and aborts the process: SIGABRT, `terminate called without
an active exception`)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sigil_feed.server.store.format import SAMPLES_SUFFIX
from sigil_feed.server.store.fs import StoreFS
from sigil_feed.server.store.reader import open_store
from tests.unit.test_store import FP, make_store

RELEASED_ON: list[threading.Thread] = []
"""The thread that let go of each _Tracked buffer last."""


class _Tracked(np.ndarray):
    """File bytes that record the thread which lets go of them last."""

    def __del__(self) -> None:
        RELEASED_ON.append(threading.current_thread())


def test_opening_a_store_lets_go_of_the_shard_bytes_on_the_opening_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The samples tables are read on the calling thread: no Arrow pool thread holds their bytes after
    open_store returns (pq.read_table scanned through the pool, whose workers released a few percent of them)."""
    fs, path = make_store(tmp_path)
    read_bytes = StoreFS.read_bytes

    created: list[str] = []

    def tracked(self: StoreFS, where: str) -> bytes:
        data = read_bytes(self, where)
        if not where.endswith(SAMPLES_SUFFIX):
            return data
        created.append(where)
        return np.frombuffer(data, dtype=np.uint8).copy().view(_Tracked)  # type: ignore[return-value]

    monkeypatch.setattr(StoreFS, "read_bytes", tracked)
    RELEASED_ON.clear()
    opens = 200
    for _ in range(opens):
        open_store(fs, path, FP)
    gc.collect()
    deadline = time.monotonic() + 5
    while len(RELEASED_ON) < len(created) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(created) >= opens and len(RELEASED_ON) == len(created)  # the samples index, or every shard's table
    others = [t.name for t in RELEASED_ON if t is not threading.current_thread()]
    assert others == [], f"{len(others)} of {len(created)} samples buffers were released on other threads: {others[:3]}"
