"""Data that changes during a run, through the real server and client: data that moves (copied elsewhere, touched)
keeps its store and every cursor; a file whose content changed makes a new store, named in the log; files added to
a glob are served from the next epoch on, the current epoch unaffected, with only their shards built."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import ServerProcess, rust_pair, write_config, write_jsonl

CLI = [sys.executable, "-m", "sigil_feed.server.cli"]

PAIRS = 12  # per file


def pairs(folder: Path, *names: int) -> None:
    """`folder/p{n}.jsonl` of PAIRS pairs each."""
    for n in names:
        write_jsonl(folder / f"p{n}.jsonl", [rust_pair(i) for i in range(PAIRS * n, PAIRS * n + PAIRS)])


def config(tmp_path: Path, data: str, *, cached: bool = True, **extra: Any) -> Path:
    return write_config(tmp_path / "c.yaml", {
        "names": [f"local:{data}/*.jsonl"], "use_cache": cached, "cache_dir": str(tmp_path / "cache"),
        "shuffle_seed": 7, "remainder": "keep", **extra}, max_seq_len=128, pack=False)


def stores(tmp_path: Path) -> list[Path]:
    return sorted(p.parent for p in (tmp_path / "cache").glob("*/manifest.json"))


def digest(batch: dict[str, Any]) -> str:
    return hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]


def rows(batch: dict[str, Any]) -> list[tuple[int, ...]]:
    """The batch's samples (pack: false: one per row)."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"],
                                                                   strict=True)]


def read(target: str, steps: int, state: dict[str, Any] | None = None) -> tuple[list[str], dict[str, Any]]:
    """`steps` batches' digests from a state (None: the start), and the state after them."""
    ds = FeedDataset(target, batch_size=4, prefetch=1)
    if state is not None:
        ds.load_state_dict(state)
    out = []
    for step, batch in enumerate(ds):
        out.append(digest(batch))
        if step + 1 == steps:
            break
    return out, ds.state_dict()


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streaming"])
def test_data_moved_or_touched_keeps_store_and_cursor_and_changed_content_makes_a_new_store_named_in_the_log(
        tmp_path: Path, start_server, cached: bool) -> None:
    pairs(tmp_path / "a", 0, 1, 2)
    server = start_server(config(tmp_path, "a", cached=cached))
    reference, _ = read(server.target, 8)
    _, state = read(server.target, 3)
    server.stop()
    built = stores(tmp_path)

    shutil.copytree(tmp_path / "a", tmp_path / "mnt" / "b")  # another path (the YAML says so), every mtime new
    shutil.rmtree(tmp_path / "a")
    for path in (tmp_path / "mnt" / "b").iterdir():
        os.utime(path, (1_000_000, 1_000_000))
    server = start_server(config(tmp_path, "mnt/b", cached=cached))
    moved, _ = read(server.target, 5, state)
    server.stop()
    assert moved == reference[3:8]  # the cursor was accepted and continues exactly
    assert stores(tmp_path) == built and not any("tokenizing" in line for line in server.output)

    for path in (tmp_path / "mnt" / "b").iterdir():  # touched where they lie
        path.touch()
    server = start_server(config(tmp_path, "mnt/b", cached=cached))
    touched, _ = read(server.target, 5, state)
    server.stop()
    assert touched == reference[3:8]
    assert stores(tmp_path) == built and not any("tokenizing" in line for line in server.output)

    changed = tmp_path / "mnt" / "b" / "p1.jsonl"
    changed.write_text(changed.read_text().replace("item_13(", "item_99("))
    server = start_server(config(tmp_path, "mnt/b", cached=cached))
    if cached:
        again, _ = read(server.target, 5, state)  # an epoch begun over the old content finishes over it
        assert again == reference[3:8]
        assert len(stores(tmp_path)) == 2
        said = [line for line in server.output if "content changed: " in line]
        assert said and str(changed) in said[0], "".join(server.output)
    else:  # streaming reads the files as they are: the epoch cannot continue over the old content
        with pytest.raises(Exception, match="changed since"):
            read(server.target, 1, state)
        assert len(read(server.target, 1)[0]) == 1  # a run that starts afresh reads the new content
    server.stop()


def stores_of(server: ServerProcess) -> list[str]:
    """The token stores the server logged as ready, in order."""
    return [line.split("token store ready: ")[1].split(" ")[0].rsplit("/", 1)[1] for line in server.output
            if "token store ready: " in line]


def epochs(target: str, *, grow: Any = None, after: int = 0, state: dict[str, Any] | None = None
           ) -> tuple[dict[int, list[str]], dict[int, Counter[tuple[int, ...]]], dict[str, Any] | None]:
    """Every batch's digest and every row, by epoch, to the end of the run; `grow()` is called after `after` batches
    (and the state at that point is returned)."""
    ds = FeedDataset(target, batch_size=4, prefetch=1)
    if state is not None:
        ds.load_state_dict(state)
    digests: dict[int, list[str]] = {}
    seen: dict[int, Counter[tuple[int, ...]]] = {}
    saved = None
    for step, batch in enumerate(ds):
        assert ds.epoch is not None
        digests.setdefault(ds.epoch, []).append(digest(batch))
        seen.setdefault(ds.epoch, Counter()).update(rows(batch))
        if grow is not None and step + 1 == after:
            saved = ds.state_dict()
            grow()
    return digests, seen, saved


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streaming"])
def test_files_added_to_a_glob_are_served_from_the_next_epoch_building_only_their_shards(
        tmp_path: Path, start_server, cached: bool) -> None:
    data = tmp_path / "data"
    pairs(data, 0, 2, 4)
    server = start_server(config(tmp_path, "data", cached=cached, epochs=2))
    whole, whole_rows, _ = epochs(server.target)  # an uninterrupted run over the three files
    assert sum(whole_rows[0].values()) == 3 * PAIRS and whole_rows[0] == whole_rows[1]
    server.stop()  # (a server fixes each epoch's files when the epoch first opens there: a new run, a new server)

    # a run that sees files land in the middle of its first epoch (p1 sorts before the others: their indices move)
    server = start_server(config(tmp_path, "data", cached=cached, epochs=2))
    grown, grown_rows, state = epochs(server.target, grow=lambda: pairs(data, 1, 6), after=3)
    assert grown[0] == whole[0]  # the current epoch is unaffected, batch for batch
    assert sum(grown_rows[1].values()) == 5 * PAIRS and set(grown_rows[1].values()) == {1}
    assert set(grown_rows[0]) < set(grown_rows[1])  # the next epoch serves every file, each sample once
    with grpc.insecure_channel(server.target) as channel:
        stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=10)
    members = [(m.epoch, list(m.files), m.content) for m in stats.datasets[0].epoch_members]
    assert [m[:2] for m in members] == [(0, [3]), (1, [5])] and members[0][2] != members[1][2]
    printed = subprocess.run([*CLI, "stats", "--target", server.target], capture_output=True, text=True, timeout=60)
    assert f"epochs' files: 0: 3 files (content {members[0][2]}); 1: 5 files (content {members[1][2]})" in \
        printed.stdout, printed.stdout
    log = "".join(server.output)
    assert "epoch 1 serves the sources' files as they are now ([5] files per source" in log
    if cached:
        assert members[1][2] == stores_of(server)[-1]
        assert "2 written, 0 complete from before, 3 taken from the dataset's other stores" in log
    server.stop()
    assert len(stores(tmp_path)) == (2 if cached else 0)

    # a checkpoint of the first epoch, taken before the files landed, resumes on a new server over the data it began
    # with (cached mode: from its store), then serves the grown data from the next epoch on, as the live run did
    server = start_server(config(tmp_path, "data", cached=cached, epochs=2))
    if cached:
        resumed, _, _ = epochs(server.target, state=state)
        assert resumed[0] == grown[0][3:] and resumed[1] == grown[1]
        assert not any("tokenizing" in line for line in server.output)
    else:  # streaming reads the files as they are now: that epoch cannot be continued, and says so
        with pytest.raises(Exception, match="changed since"):
            epochs(server.target, state=state)
    server.stop()
