"""The token store on disk: manifest validation, unique temporary names, owner liveness, reclaiming, commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sigil_feed.server.cache.manifest import MANIFEST, SAMPLES, TOKENS, StoreDamaged
from sigil_feed.server.cache.owner import (
    OWNER,
    STALE_AFTER_S,
    Heartbeat,
    discard,
    new_owner,
    owner_alive,
    reclaim,
    temp_folders,
    temp_name,
    this_machine,
)
from sigil_feed.server.cache.store import StoreWriter, list_stores, open_store

FP = "0123456789abcdef"
META = {"dataset": "d", "tokenizer_fingerprint": "t", "token_facts": {"vocab_size": 100, "eos_id": 0, "pad_id": 0},
        "sources": [{"spec": "local:a.jsonl", "read": 3, "kept": 3, "dropped": {}, "malformed": {}, "tokens": 9,
                     "lengths": [0, 3]}]}


def writer(cache: Path) -> StoreWriter:
    """A writer holding three samples of three tokens."""
    w = StoreWriter(cache, FP, np.dtype("<u2"))
    w.append([np.arange(3) + i for i in range(3)], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 2])
    return w


def edit_manifest(store: Path, change: Any) -> None:
    manifest = json.loads((store / MANIFEST).read_text())
    (store / MANIFEST).write_text(json.dumps(change(manifest)))


def test_a_written_store_opens_and_lists_exactly_its_files(tmp_path: Path) -> None:
    store = open_store(writer(tmp_path).commit(META), FP)
    assert len(store) == 3 and store.manifest.tokens == 9 and set(store.manifest.files) == {TOKENS, SAMPLES}
    assert sorted(p.name for p in store.path.iterdir()) == [MANIFEST, SAMPLES, TOKENS]  # no owner record left
    assert temp_folders(tmp_path) == []


def _set(key: str, value: Any) -> Any:
    return lambda m: {**m, key: value}


def _without(key: str) -> Any:
    return lambda m: {k: v for k, v in m.items() if k != key}


def _file(name: str, **facts: Any) -> Any:
    return lambda m: {**m, "files": {**m["files"], name: {**m["files"].get(name, {}), **facts}}}


@pytest.mark.parametrize(("change", "reason"), [
    (_without("files"), "files: Field required"),
    (_set("files", {}), "must list exactly tokens.bin, samples.parquet"),
    (lambda m: {**m, "files": {TOKENS: m["files"][TOKENS]}}, "missing ['samples.parquet']"),
    (_file("extra.bin", size=1, xxh3="0" * 16), "unexpected ['extra.bin']"),
    (_file(TOKENS, size="18"), "files.tokens.bin.size: Input should be a valid integer"),
    (_file(TOKENS, xxh3=7), "files.tokens.bin.xxh3"),
    (_without("tokens"), "tokens: Field required"),
    (_set("samples", -1), "samples: Input should be greater than or equal to 0"),
    (_set("dtype", "<f8"), "dtype"),
    (_without("sources"), "sources: Field required"),
    (_set("token_facts", {"vocab_size": "x"}), "token_facts"),
    (_set("format", 2), "format 2"),
    (_set("fingerprint", "f" * 16), "does not match"),
    (lambda m: [m], "not a JSON object"),
    (_set("tokens", 8), "counts 8 tokens"),
    (_set("samples", 4), "3 rows, but the manifest counts 4"),
])
def test_an_invalid_manifest_is_damage_with_the_reason(tmp_path: Path, change: Any, reason: str) -> None:
    path = writer(tmp_path).commit(META)
    edit_manifest(path, change)
    with pytest.raises(StoreDamaged) as damage:
        open_store(path, FP, verify=False)
    assert reason in str(damage.value)


def test_empty_files_no_longer_turns_checksums_off(tmp_path: Path) -> None:
    path = writer(tmp_path).commit(META)
    edit_manifest(path, _set("files", {}))
    (path / TOKENS).write_bytes(bytes(18))  # same size, other tokens
    with pytest.raises(StoreDamaged):
        open_store(path, FP)


def test_temporary_names_are_unique_per_build_even_with_one_pid(tmp_path: Path) -> None:
    a, b = new_owner(), new_owner()
    assert a.pid == b.pid and temp_name(FP, a) != temp_name(FP, b)
    assert temp_name(FP, a).startswith(f".{FP}.tmp-") and f"-{a.pid}-" in temp_name(FP, a)


def test_owner_liveness_rules() -> None:
    here = this_machine()
    me = new_owner()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    assert owner_alive(me, 10**6, machine=here)  # a live local process: alive however old its heartbeat
    assert not owner_alive(replace(me, pid=int(dead.stdout)), 0, machine=here)  # exited
    assert not owner_alive(replace(me, started=me.started + 1), 0, machine=here)  # the PID was reused
    elsewhere = replace(me, machine="another-host:boot:pid:[1]")
    assert owner_alive(elsewhere, STALE_AFTER_S - 5, machine=here)
    assert not owner_alive(elsewhere, STALE_AFTER_S + 5, machine=here)
    assert owner_alive(None, 5, machine=here) and not owner_alive(None, STALE_AFTER_S + 5, machine=here)


def _temp(cache: Path, name: str, owner: dict[str, Any] | None, age: float) -> Path:
    folder = cache / name
    folder.mkdir(parents=True)
    (folder / TOKENS).write_bytes(b"x" * 100)
    stamped = folder
    if owner is not None:
        stamped = folder / OWNER
        stamped.write_text(json.dumps(owner))
    then = os.path.getmtime(stamped) - age
    os.utime(stamped, (then, then))
    return folder


def test_reclaim_removes_only_the_folders_of_builders_that_are_gone(tmp_path: Path) -> None:
    me = asdict(new_owner())
    old = STALE_AFTER_S + 60
    keep = [_temp(tmp_path, ".a.tmp-live", me, old),
            _temp(tmp_path, ".b.tmp-remote-fresh", {**me, "machine": "elsewhere"}, 5),
            _temp(tmp_path, ".c.tmp-starting", None, 5),
            _temp(tmp_path, "d", None, old)]  # a store in place is never a temporary folder
    gone = [_temp(tmp_path, ".e.tmp-dead", {**me, "pid": 2**22 + 1}, 0),
            _temp(tmp_path, ".f.tmp-reused", {**me, "started": me["started"] + 1}, 0),
            _temp(tmp_path, ".g.tmp-remote-stale", {**me, "machine": "elsewhere"}, old),
            _temp(tmp_path, ".h.tmp-1", None, old),  # the old PID-only name, no owner record
            _temp(tmp_path, ".i.del-1234", None, 0)]
    assert {t.path for t in temp_folders(tmp_path) if not t.alive} == set(gone)
    assert {t.path for t in reclaim(tmp_path, "e")} == {gone[0]}
    assert {t.path for t in reclaim(tmp_path)} == set(gone[1:])
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


def test_a_temporary_folder_names_its_owner_until_it_is_gone(tmp_path: Path) -> None:
    owner = new_owner()
    folder = tmp_path / temp_name(FP, owner)
    folder.mkdir()
    beat = Heartbeat(folder, owner)
    beat.stop()
    assert json.loads((folder / OWNER).read_text()) == asdict(owner)
    (temp,) = temp_folders(tmp_path)
    assert temp.owner == owner and temp.alive and temp.describe().startswith(f"building by {owner.label}")


def test_two_builders_of_one_fingerprint_in_one_process_keep_the_first_store(tmp_path: Path) -> None:
    """Two writers with the same PID (PID 1 in two containers sharing a volume) neither clobber each other's
    temporary folder nor replace the store the first one put in place."""
    first, second = writer(tmp_path), writer(tmp_path)
    assert first.tmp != second.tmp and len(temp_folders(tmp_path)) == 2
    final = first.commit(META)
    inode = final.stat().st_ino
    assert second.commit({**META, "dataset": "second"}) == final
    assert final.stat().st_ino == inode and open_store(final, FP).manifest.dataset == "d"
    assert temp_folders(tmp_path) == []


def test_commit_replaces_a_damaged_store(tmp_path: Path) -> None:
    (tmp_path / FP).mkdir()
    (tmp_path / FP / MANIFEST).write_text("{}")
    final = writer(tmp_path).commit(META)
    assert open_store(final, FP).manifest.dataset == "d" and temp_folders(tmp_path) == []


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    path = writer(tmp_path).commit(META)
    discard(path)
    discard(path)  # already gone: nothing to do
    assert list(tmp_path.iterdir()) == []


def test_list_stores_shows_damaged_stores_and_never_a_temporary_folder(tmp_path: Path) -> None:
    writer(tmp_path).commit(META)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{}")
    (tmp_path / f".{FP}.tmp-host-1-token").mkdir()
    (tmp_path / f".{FP}.tmp-host-1-token" / MANIFEST).write_text("{}")  # a build about to be renamed
    listed = {Path(s["path"]).name: s for s in list_stores(tmp_path)}
    assert set(listed) == {FP, "bad"} and listed[FP]["state"] == "ready" and listed[FP]["samples"] == 3
    assert listed["bad"]["state"] == "damaged" and "format None" in listed["bad"]["reason"]
