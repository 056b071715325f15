"""A source added to `names`, or one removed, through the real server and client. At an epoch boundary (the end of
an epoch, or its last step's checkpoint), in both modes: the next epoch is exactly the one a run of the new
configuration serves. Inside an epoch: cached mode continues the epoch from the resumed row under the new list
(an added source from its first sample, a removed one no longer drawn, nothing served twice), on another world
size, and says so in its log and GetStats; streaming mode finishes the shuffle block in progress under the old list
and goes on under the new one from the next."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from sigil_feed.client import BatchStream, EpochEnd, FeedBatch
from tests.conftest import rust_pair, write_config, write_jsonl
from tests.integration.test_elastic import STEP_ROWS, read
from tests.integration.test_mixture_schedule import mixture

BROAD, CURATED, EXTRA = "local:broad/*.jsonl", "local:curated.jsonl", "local:extra.jsonl"
Batches = list[list[str]]


def config(tmp_path: Path, cached: bool, names: list[str], name: str, **more: Any) -> Path:
    if not (tmp_path / "extra.jsonl").exists():
        for part in range(2):
            write_jsonl(tmp_path / "broad" / f"part{part}.jsonl",
                        [rust_pair(i) for i in range(60 * part, 60 * part + 60)])
        write_jsonl(tmp_path / "curated.jsonl", [rust_pair(i, task="explain") for i in range(300, 350)])
        write_jsonl(tmp_path / "extra.jsonl", [{**rust_pair(i), "gen": rust_pair(i)["gen"] + "    // extra\n"}
                                               for i in range(500, 540)])
    return write_config(tmp_path / name, {
        "names": names, "use_cache": cached, "cache_dir": str(tmp_path / "cache"), "shuffle_seed": 3,
        "shuffle_block": 16, "virtual_ranks": 12, "remainder": "keep", "epochs": 2, "interleave_mode": "weighted",
        "stopping_strategy": "all_exhausted", **more}, max_seq_len=64, pack=more.pop("pack", True))


def epochs(target: str, cursor: bytes = b"") -> tuple[dict[int, Batches], dict[int, list[bytes]], list[bytes]]:
    """One rank's batches (row hashes) per epoch from `cursor`, each batch's cursor, and the epoch ends' cursors."""
    batches: dict[int, Batches] = {}
    cursors: dict[int, list[bytes]] = {}
    ends = []
    with BatchStream(target, batch_size=STEP_ROWS, cursor=cursor) as stream:  # a 4-rank step's rows
        for item in stream:
            if isinstance(item, EpochEnd):
                ends.append(item.cursor)
            elif isinstance(item, FeedBatch):
                batches.setdefault(item.epoch, []).append(
                    [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in item.arrays["input_ids"]])
                cursors.setdefault(item.epoch, []).append(item.cursor)
    return batches, cursors, ends


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "cached"])
def test_a_source_added_or_removed_at_an_epoch_boundary(tmp_path: Path, start_server, cached: bool) -> None:
    old = start_server(config(tmp_path, cached, [BROAD, CURATED], "old.yaml"))
    before, _, (end, _) = epochs(old.target)
    _, at_last_step = read(old.target, 4, len(before[0]))  # 4 ranks after epoch 0's last step
    old.stop()
    for names in ([BROAD, CURATED, EXTRA], [BROAD]):
        new = start_server(config(tmp_path, cached, names, f"new{len(names)}.yaml"))
        fresh, _, _ = epochs(new.target)
        resumed, _, _ = epochs(new.target, end)  # the EpochEnd cursor: the next epoch over the new sources
        assert resumed == {1: fresh[1]} and fresh[1] != before[1]
        assert any(f"epoch 1 from its start: sources now {', '.join(names)}" in line for line in new.output)
        # the state of the epoch's last step (what a checkpoint holds) resumes there too, on 3 ranks
        assert read(new.target, 3, None, at_last_step)[0] == fresh[1]
        new.stop()


def rows_of(start_server: Any, tmp_path: Path, name: str) -> set[str]:
    """The rows of one source's samples (padded rows: one sample each), from a server of that source alone."""
    alone = start_server(config(tmp_path, True, [name], f"only-{len(name)}.yaml", pack=False,
                                stopping_strategy="first_exhausted"))
    served = {row for batch in epochs(alone.target)[0][0] for row in batch}
    alone.stop()
    return served


def test_a_source_added_and_one_removed_inside_a_cached_epoch(tmp_path: Path, start_server) -> None:
    common: dict[str, Any] = {"pack": False, "stopping_strategy": "first_exhausted"}
    old = start_server(config(tmp_path, True, [BROAD, CURATED], "old.yaml", **common))
    before, cursors, _ = epochs(old.target)
    _, states = read(old.target, 4, 3)  # 4 ranks, stopped after step 3 (the cursor of BatchStream's batch 2)
    old.stop()
    curated, extra = rows_of(start_server, tmp_path, CURATED), rows_of(start_server, tmp_path, EXTRA)
    new = start_server(config(tmp_path, True, [BROAD, EXTRA], "new.yaml", **common))
    resumed, _, _ = epochs(new.target, cursors[0][2])
    served = [row for batch in before[0][:3] for row in batch]
    after = [row for batch in resumed[0] for row in batch]
    assert not set(after) & curated and set(after) & extra  # the removed source is not drawn; the added one is
    assert len(served + after) == len(set(served + after))  # nothing served twice in the epoch
    three = [row for batch in read(new.target, 3, None, states)[0] for row in batch]  # 4 -> 3 ranks: the same rows
    assert sorted(three) == sorted(row for e in (0, 1) for batch in resumed[e] for row in batch)  # (keep's ragged
    assert three[:len(after) // STEP_ROWS * STEP_ROWS] == after[:len(after) // STEP_ROWS * STEP_ROWS]  # last window)
    fresh, _, _ = epochs(new.target)
    assert resumed[1] == fresh[1]  # the next epoch: the new configuration's
    (change,) = [c for c in mixture(new.target).accepted_changes if "sources now" in c]
    assert change.startswith(f"epoch 0 from row {3 * STEP_ROWS}: sources now {BROAD}, {EXTRA} (added: {EXTRA}; "
                             f"removed: {CURATED})")
    assert any("sources changed on resume: epoch 0 from row" in line for line in new.output)
    new.stop()


def test_a_source_swapped_inside_a_streaming_epoch_resumed_on_another_world_size(
        tmp_path: Path, start_server) -> None:
    """Streaming mode, padded rows (a sample each), `all_exhausted`: the shuffle block in progress is finished under
    the old list, then the added source is served whole, the removed one no more, and nothing served in the epoch
    comes again while its source has unserved samples; 4 ranks stopped there resume on 3 with the same rows."""
    common: dict[str, Any] = {"pack": False, "stopping_strategy": "all_exhausted"}
    rows = {name: rows_of(start_server, tmp_path, name) for name in (BROAD, CURATED, EXTRA)}
    old = start_server(config(tmp_path, False, [BROAD, CURATED], "old.yaml", **common))
    before, cursors, _ = epochs(old.target)
    _, states = read(old.target, 4, 3)  # 4 ranks, stopped after step 3 (the cursor of BatchStream's batch 2)
    old.stop()
    new = start_server(config(tmp_path, False, [BROAD, EXTRA], "new.yaml", **common))
    resumed, _, _ = epochs(new.target, cursors[0][2])
    served = [row for batch in before[0][:3] for row in batch]
    after = [row for batch in resumed[0] for row in batch]
    assert rows[EXTRA] <= set(after)  # the added source, whole
    assert not set(after[16:]) & rows[CURATED]  # past the shuffle block in progress (16 samples), not drawn
    for i, row in enumerate(after):  # a sample drawn again only once its source has no unserved one left (served
        if row in served or row in after[:i]:  # in the same shuffle block of 16, at the latest)
            (source,) = [name for name in (BROAD, EXTRA) if row in rows[name]]
            assert rows[source] - set(served) <= set(after[:i + 16])
    three = [row for batch in read(new.target, 3, None, states)[0] for row in batch]  # 4 -> 3 ranks: the same rows
    assert sorted(three) == sorted(row for e in (0, 1) for batch in resumed[e] for row in batch)
    assert three[:len(after) // STEP_ROWS * STEP_ROWS] == after[:len(after) // STEP_ROWS * STEP_ROWS]
    (change,) = [c for c in mixture(new.target).accepted_changes if "sources now" in c]
    assert change.startswith(f"epoch 0 from the next shuffle block: sources now {BROAD}, {EXTRA} (added: {EXTRA}; "
                             f"removed: {CURATED})")
    new.stop()
