"""The token store on disk: manifest validation, opening shards, unique temporary names, owner liveness,
reclaiming."""

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

from sigil_feed.server.pipeline.accounting import merge_accounting
from sigil_feed.server.store.format import (
    MANIFEST,
    Manifest,
    ShardRows,
    StoreDamaged,
    TokenFacts,
    shard_name,
    shard_paths,
    store_dir,
    write_manifest,
    write_shard,
)
from sigil_feed.server.store.fs import StoreFS, resolve
from sigil_feed.server.store.lease import Lease
from sigil_feed.server.store.owner import (
    OWNER,
    STALE_AFTER_S,
    discard,
    new_owner,
    owner_alive,
    reclaim,
    temp_folders,
    temp_name,
    this_machine,
)
from sigil_feed.server.store.reader import list_stores, open_store

FP = "0123456789abcdef"
ACCOUNTING = {"spec": "local:a.jsonl", "read": 2, "kept": 2, "dropped": {"too_short": 1}, "malformed": {},
              "tokens": 6, "lengths": [2] + [0] * 17}


def make_store(root: Path) -> tuple[StoreFS, str]:
    """A committed store of two shards of source 0: samples of 3 tokens (ids 0-2, 1-3) and one of 3 (ids 2-4)."""
    fs = resolve(root)
    store = store_dir(fs, FP)
    shards = []
    for part, starts in enumerate(([0, 1], [2])):
        ids = np.concatenate([np.arange(3) + i for i in starts])
        rows = ShardRows(ids=ids, lengths=np.full(len(starts), 3), prompt_tokens=np.zeros(len(starts)),
                         file=np.full(len(starts), part), row=np.arange(len(starts)),
                         task_type=["completion", None][:len(starts)])
        shards.append(write_shard(fs, store, shard_name(FP, 0, f"f{part}"), [rows], source=0, dtype="<u2",
                                  accounting=ACCOUNTING))
    write_manifest(fs, store, Manifest(
        format=2, fingerprint=FP, dtype="<u2", samples=3, tokens=9, created=1.0, dataset="d", shards=shards,
        sources=[merge_accounting("local:a.jsonl", shards)], tokenizer_fingerprint="t",
        token_facts=TokenFacts(vocab_size=100, eos_id=0, pad_id=0)))
    return fs, store


def edit_manifest(store: str, change: Any) -> None:
    path = Path(store) / MANIFEST
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_a_written_store_opens_across_its_shards(tmp_path: Path) -> None:
    fs, path = make_store(tmp_path)
    store = open_store(fs, path, FP)
    assert len(store) == 3 and store.manifest.tokens == 9 and store.shard.tolist() == [0, 0, 1]
    with store.shards.pinned([0, 1]) as tokens:
        got = [tokens[s][o:o + n].tolist() for s, o, n in zip(store.shard, store.offsets, store.lengths, strict=True)]
    assert got == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert store.file.tolist() == [0, 0, 1] and store.row.tolist() == [0, 1, 0]
    assert [store.task_types[t] if t >= 0 else None for t in store.task] == ["completion", None, "completion"]
    merged = store.manifest.sources[0]
    assert (merged.read, merged.dropped, merged.lengths[0]) == (4, {"too_short": 2}, 4)
    assert temp_folders(Path(path) / "shards") == [] and store.bytes_fetched() == 0  # local: read in place


def _set(key: str, value: Any) -> Any:
    return lambda m: {**m, key: value}


def _without(key: str) -> Any:
    return lambda m: {k: v for k, v in m.items() if k != key}


def _shard(**facts: Any) -> Any:
    return lambda m: {**m, "shards": [{**m["shards"][0], **facts}, *m["shards"][1:]]}


@pytest.mark.parametrize(("change", "reason"), [
    (_without("shards"), "shards: Field required"),
    (_set("shards", []), "the shards' samples do not sum to 3"),
    (lambda m: {**m, "shards": m["shards"][:1]}, "do not sum"),
    (lambda m: {**m, "shards": [m["shards"][0]] * 2}, "shard names repeat"),
    (_shard(tokens_file={"size": "12", "xxh3": "0" * 16}), "tokens_file.size: Input should be a valid integer"),
    (_shard(samples_file={"size": 1, "xxh3": 7}), "samples_file.xxh3"),
    (_shard(name="../../etc/passwd"), "name: String should match pattern"),
    (_shard(tokens=5), "tokens file of 12 bytes, but 5 tokens"),
    (_without("tokens"), "tokens: Field required"),
    (_set("samples", -1), "samples: Input should be greater than or equal to 0"),
    (_set("dtype", "<f8"), "dtype"),
    (_without("sources"), "sources: Field required"),
    (_set("token_facts", {"vocab_size": "x"}), "token_facts"),
    (_set("format", 3), "format 3"),
    (_set("fingerprint", "f" * 16), "does not match"),
    (lambda m: [m], "not a JSON object"),
])
def test_an_invalid_manifest_is_damage_with_the_reason(tmp_path: Path, change: Any, reason: str) -> None:
    fs, path = make_store(tmp_path)
    edit_manifest(path, change)
    with pytest.raises(StoreDamaged) as damage:
        open_store(fs, path, FP, verify=False)
    assert reason in str(damage.value)


@pytest.mark.parametrize(("damage", "reason"), [("truncate", "missing or truncated"), ("flip", "checksum mismatch"),
                                               ("rows", "2 rows, but the manifest counts 1")])
def test_a_damaged_shard_is_damage_with_the_reason(tmp_path: Path, damage: str, reason: str) -> None:
    fs, path = make_store(tmp_path)
    first, second = open_store(fs, path, FP).manifest.shards
    tokens = Path(shard_paths(path, first.name)[0])
    if damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-2])
    elif damage == "flip":
        tokens.write_bytes(bytes(len(tokens.read_bytes())))  # same size, other tokens
    else:  # a shard's samples table swapped for another's: the checksums hold only when not verified
        Path(shard_paths(path, second.name)[1]).write_bytes(Path(shard_paths(path, first.name)[1]).read_bytes())
        edit_manifest(path, lambda m: {**m, "shards": [m["shards"][0], {**m["shards"][1], "samples_file":
                                                                        m["shards"][0]["samples_file"]}]})
    with pytest.raises(StoreDamaged, match=reason):
        open_store(fs, path, FP, verify=damage != "rows")


def test_list_stores_shows_damaged_partial_and_outdated_stores_and_never_a_temporary_folder(tmp_path: Path) -> None:
    make_store(tmp_path)
    for name, manifest in (("1" * 16, "{}"), ("2" * 16, '{"format": 1}'), ("3" * 16, None)):
        (tmp_path / name / "shards").mkdir(parents=True)
        if manifest is not None:
            (tmp_path / name / MANIFEST).write_text(manifest)
    (tmp_path / f".{FP}.tmp-host-1-token").mkdir()
    (tmp_path / "shards").mkdir()  # not a fingerprint: a folder of fetched shards, say
    listed = {Path(s["path"]).name: s for s in list_stores(resolve(tmp_path))}
    assert set(listed) == {FP, "1" * 16, "2" * 16, "3" * 16}
    assert listed[FP]["state"] == "ready" and listed[FP]["samples"] == 3 and listed[FP]["shards"] == 2
    assert [listed[n * 16]["state"] for n in "123"] == ["damaged", "outdated", "partial"]
    assert "building by" not in listed["3" * 16]["reason"]
    with Lease.try_acquire(str(tmp_path / ("3" * 16))):
        reason = list_stores(resolve(tmp_path))[-1]["reason"]
    assert reason.endswith(f"; building by {new_owner().label}")


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    _, path = make_store(tmp_path)
    discard(Path(path))
    discard(Path(path))  # already gone: nothing to do
    assert list(tmp_path.iterdir()) == []


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
    (folder / "tokens.bin").write_bytes(b"x" * 100)
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


def test_a_temporary_folder_of_an_older_builder_names_its_owner(tmp_path: Path) -> None:
    owner = new_owner()
    folder = tmp_path / temp_name(FP, owner)
    folder.mkdir()
    (folder / OWNER).write_text(json.dumps(asdict(owner)))
    (temp,) = temp_folders(tmp_path)
    assert temp.owner == owner and temp.alive and temp.describe().startswith(f"building by {owner.label}")


def test_temporary_files_are_stale_once_their_heartbeat_mtime_is_old(tmp_path: Path) -> None:
    """A file being written (fs.open_write) has no owner record: its mtime is its heartbeat."""
    fs = resolve(tmp_path)
    with fs.open_write(fs.path("shards", "a.tokens.bin")) as out:
        out.write(b"x")
        (writing,) = temp_folders(tmp_path / "shards")
        assert writing.alive and writing.path.is_file()
    assert temp_folders(tmp_path / "shards") == []  # renamed into place
    left = tmp_path / "shards" / temp_name("b.tokens.bin", new_owner())
    left.write_bytes(b"x")
    then = os.path.getmtime(left) - STALE_AFTER_S - 5
    os.utime(left, (then, then))
    assert [t.path for t in reclaim(tmp_path / "shards")] == [left] and not left.exists()
    assert (tmp_path / "shards" / "a.tokens.bin").read_bytes() == b"x"


def test_a_temporary_file_of_a_dead_process_of_this_host_is_stale_at_once(tmp_path: Path) -> None:
    """A builder killed mid-write leaves a fresh temporary file; its name says which process wrote it, so the
    builder that takes over reclaims it without waiting for its mtime to age."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shards = tmp_path / "shards"
    shards.mkdir()
    left = shards / temp_name("a.tokens.bin", replace(new_owner(), pid=dead.pid))
    mine = shards / temp_name("b.tokens.bin", new_owner())
    for path in (left, mine):
        path.write_bytes(b"x")
    assert [t.path for t in reclaim(shards)] == [left]
    assert mine.exists() and not left.exists()
