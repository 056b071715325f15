"""Elastic resume through the real server and client: a job of 4 ranks stops mid-epoch, resumes on 2 ranks, stops
again and finishes the epoch on 3, and trains on exactly the global batches of an uninterrupted 4-rank run."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.client.integrations.ranks import resume_state
from sigil_feed.server.rows.deal import Deal
from tests.conftest import rust_pair, write_config, write_jsonl

STEP_ROWS = 24  # rows per global batch: 4 x 6, 2 x 12, 3 x 8


def config(tmp_path: Path, cached: bool) -> Path:
    for part in range(6):
        write_jsonl(tmp_path / "pairs" / f"part{part}.jsonl",
                    [{**rust_pair(i), "gen": rust_pair(i)["gen"] + "    // more\n" * (i % 4)}
                     for i in range(80 * part, 80 * part + 80)])
    return write_config(tmp_path / f"c{cached}.yaml", {
        "names": ["local:pairs/*.jsonl"], "use_cache": cached, "cache_dir": str(tmp_path / "cache"),
        "shuffle_seed": 3, "shuffle_block": 32, "virtual_ranks": 24, "remainder": "keep", "epochs": 1},
        max_seq_len=64)


def read(target: str, world: int, steps: int | None, states: list[Any] | None = None
         ) -> tuple[list[list[str]], list[Any]]:
    """Up to `steps` global batches (all, if None) from `world` ranks reading at once, each rank starting from
    what resume_state gives it out of `states`; the global batches (row hashes in global row order) and every
    rank's state after its last batch."""
    per_rank: list[list[list[str]]] = [[] for _ in range(world)]
    saved: list[Any] = [None] * world

    def run(rank: int) -> None:
        ds = FeedDataset(target, batch_size=STEP_ROWS // world, rank=rank, world_size=world, prefetch=2)
        if states is not None:
            ds.load_state_dict(resume_state(states, rank, world))
        for batch in ds:
            per_rank[rank].append([hashlib.blake2b(row.numpy().tobytes(), digest_size=8).hexdigest()
                                   for row in batch["input_ids"]])
            if len(per_rank[rank]) == steps:
                break
        saved[rank] = ds.state_dict()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    virtual = FeedDataset(target, batch_size=1).fetch_info().virtual_ranks
    dealt = [Deal(rank, world, STEP_ROWS // world, virtual).rows(0).tolist() for rank in range(world)]  # the server's
    batches = []  # every step starts at a multiple of STEP_ROWS, so of world: the deal's rows, relative to it
    for step in range(len(per_rank[0])):
        rows = {dealt[rank][i]: row for rank in range(world) if step < len(per_rank[rank])
                for i, row in enumerate(per_rank[rank][step])}
        batches.append([rows[j] for j in sorted(rows)])
    return batches, saved


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "cached"])
def test_four_ranks_resume_on_two_then_three_with_the_global_batches_of_an_uninterrupted_run(
        tmp_path: Path, start_server, cached: bool) -> None:
    target = start_server(config(tmp_path, cached)).target
    uninterrupted, _ = read(target, 4, None)
    assert FeedDataset(target, batch_size=1).fetch_info().virtual_ranks == (24 if cached else 1)
    assert len(uninterrupted) > 9 and len({row for rows in uninterrupted for row in rows}) > 200
    first, four = read(target, 4, 3)
    second, two = read(target, 2, 4, four)
    third, _ = read(target, 3, None, two)
    assert first + second + third == uninterrupted
    with pytest.raises(ValueError, match=r"lacks the feed position of rank\(s\) \[1\] of the 4"):
        resume_state([four[0], None, four[2], four[3]], 0, 2)
