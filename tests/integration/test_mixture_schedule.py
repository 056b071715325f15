"""A two-phase run (ADR-002: broad data, then curated data) as one schedule, through the real server and client:
stopped in phase 2 on 4 ranks, resumed on 3 ranks, it trains on exactly the global batches of the uninterrupted
4-rank run; GetStats shows the phase and the next change. Resumed instead by a server whose configuration
changed the mixture, the new mixture applies from the resumed row (cached; streaming: the next shuffle block),
a later resume continues that plan exactly, and the server says so in its log and in GetStats."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import ServerProcess, rust_pair, write_config, write_jsonl
from tests.integration.test_elastic import STEP_ROWS, read

BROAD, CURATED = "local:broad/*.jsonl", "local:curated.jsonl"
TWO_PHASES = [{"from_epoch": 0, "weights": {BROAD: 3.0, CURATED: 1.0}},
              {"from_epoch": 1, "weights": {BROAD: 0.5, CURATED: 4.0}}]


def config(tmp_path: Path, cached: bool, weights: Any, name: str) -> Path:
    if not (tmp_path / "curated.jsonl").exists():
        for part in range(3):
            write_jsonl(tmp_path / "broad" / f"part{part}.jsonl",
                        [{**rust_pair(i), "gen": rust_pair(i)["gen"] + "    // more\n" * (i % 4)}
                         for i in range(100 * part, 100 * part + 100)])
        write_jsonl(tmp_path / "curated.jsonl", [{**rust_pair(i, task="explain"), "gen": rust_pair(i)["gen"]
                                                  + "    // curated\n" * (1 + i % 3)} for i in range(500, 620)])
    return write_config(tmp_path / name, {
        "names": [BROAD, CURATED], "use_cache": cached, "cache_dir": str(tmp_path / "cache"), "shuffle_seed": 3,
        "shuffle_block": 32, "virtual_ranks": 12, "remainder": "keep", "epochs": 2, "interleave_mode": "weighted",
        "stopping_strategy": "all_exhausted", "dataset_weights": weights}, max_seq_len=64)


def phase_one_steps(target: str) -> int:
    """The number of global steps of epoch 0 (phase 1), read by one rank taking whole global batches."""
    ds = FeedDataset(target, batch_size=STEP_ROWS, prefetch=2)
    steps = 0
    for _ in ds:
        if ds.state_dict()["epoch"] != 0:
            break
        steps += 1
    return steps


def mixture(target: str) -> feed_pb2.MixtureStats:
    with grpc.insecure_channel(target) as channel:
        (stats,) = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest()).datasets
    return stats.mixture


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "cached"])
def test_a_two_phase_schedule_resumed_mid_phase_two_on_another_world_size(tmp_path: Path, start_server,
                                                                          cached: bool) -> None:
    server = start_server(config(tmp_path, cached, TWO_PHASES, "two_phases.yaml"))
    before = mixture(server.target)
    assert (before.epoch, before.next_change_epoch, dict(before.dataset_weights)) == (0, 1, {BROAD: 3.0, CURATED: 1.0})
    uninterrupted, _ = read(server.target, 4, None)
    ones = phase_one_steps(server.target)
    assert 4 < ones < len(uninterrupted) - 4
    first, four = read(server.target, 4, ones + 2)
    assert {state["epoch"] for state in four} == {1}  # stopped in phase 2
    now = mixture(server.target)
    assert (now.epoch, now.next_change_epoch, dict(now.dataset_weights)) == (1, -1, {BROAD: 0.5, CURATED: 4.0})
    second, _ = read(server.target, 3, None, four)
    assert first + second == uninterrupted

    server.stop()
    changed = start_server(config(tmp_path, cached, {BROAD: 1.0, CURATED: 0.25}, "changed.yaml"))
    rest, _ = read(changed.target, 3, None, four)
    assert rest and rest != uninterrupted[len(first):]  # the new mixture from the resumed row (block) on
    part, three = read(changed.target, 3, 2, four)
    more, _ = read(changed.target, 2, None, three)
    assert part + more == rest  # the epoch's plan travels in the cursor: a second resume continues it exactly
    (accepted,) = mixture(changed.target).accepted_changes
    assert f"epoch 1 from {'row' if cached else 'shuffle block'} " in accepted
    table = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "stats", "--target", changed.target],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())  # as printed, wrapped at 200 columns
    assert f"mixture of epoch 1: {BROAD}=1 {CURATED}=0.25; tasks: each once; next change: none" in text
    assert f"accepted on resume: {accepted}" in text
    assert any("mixture changed on resume" in line for line in changed.output)


INSIDE = [{"from_epoch": 0, "weights": {BROAD: 3.0, CURATED: 1.0}},
          {"from_epoch": 0, "from_row": 100, "weights": {BROAD: 0.5, CURATED: 4.0}}]  # row 100: step 4, row 4


def phase_one_then_inside(tmp_path: Path, start_server, cached: bool,
                          steps: int) -> tuple[list[list[str]], ServerProcess, str]:
    """Phase 1's first `steps` global batches on 4 ranks (a constant phase-1 config, stopped after), then a server of
    the INSIDE schedule and its `stats` table (whitespace collapsed)."""
    constant = start_server(config(tmp_path, cached, INSIDE[0]["weights"], "phase_one.yaml"))
    phase_one, _ = read(constant.target, 4, steps)
    constant.stop()
    server = start_server(config(tmp_path, cached, INSIDE, "inside.yaml"))
    table = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "stats", "--target", server.target],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    return phase_one, server, " ".join(table.stdout.split())


def assert_resumes_and_holds(server: ServerProcess, stop: int, uninterrupted: list[list[str]]) -> None:
    """Stopped on 4 ranks after step `stop` and resumed on 3, the run is the uninterrupted one batch for batch; phase 2
    holds on in epoch 1."""
    first, four = read(server.target, 4, stop)
    second, _ = read(server.target, 3, None, four)
    assert first + second == uninterrupted
    stats = mixture(server.target)
    assert (stats.epoch, list(stats.change_rows), dict(stats.dataset_weights)) == \
        (1, [], {BROAD: 0.5, CURATED: 4.0})


def test_a_phase_from_a_row_inside_the_epoch_resumed_after_it_on_another_world_size(tmp_path: Path,
                                                                                    start_server) -> None:
    """Cached mode: phase 2 starts at global row 100, inside the fifth global batch of 24 rows. Its rows before 100
    are phase 1's (a constant phase-1 config serves the same), the rows from 100 on are not; stopped on 4 ranks
    after step 6 and resumed on 3, the run is the uninterrupted one batch for batch; `stats` shows the row."""
    phase_one, server, table = phase_one_then_inside(tmp_path, start_server, True, 8)
    assert (f"mixture of epoch 0: {BROAD}=3 {CURATED}=1; tasks: each once; changes inside it at rows 100; next "
            "change: none") in table  # epoch 1 goes on with phase 2's weights
    uninterrupted, _ = read(server.target, 4, None)
    rows = [row for batch in uninterrupted[:8] for row in batch]
    assert rows[:100] == [row for batch in phase_one for row in batch][:100]
    assert not set(rows[100:192]) & set(rows[:100])  # nothing of phase 1 again
    assert rows[100:192] != [row for batch in phase_one for row in batch][100:]
    assert_resumes_and_holds(server, 6, uninterrupted)


def test_streaming_a_phase_from_a_row_resumed_in_phase_two_on_another_world_size(tmp_path: Path,
                                                                                  start_server) -> None:
    """Streaming mode: phase 2 from global row 100 takes effect from the first shuffle block that starts at or after
    row 100. The rows before it are phase 1's (a constant phase-1 config serves the same), the rows from that block
    on are not; stopped on 4 ranks two steps after it and resumed on 3, the run is the uninterrupted one batch for
    batch; `stats` shows the row and the rule."""
    phase_one, server, table = phase_one_then_inside(tmp_path, start_server, False, 12)
    assert (f"mixture of epoch 0: {BROAD}=3 {CURATED}=1; tasks: each once; changes inside it at rows 100 (streaming: "
            "from the first shuffle block that starts at or after it); next change: none") in table
    uninterrupted, _ = read(server.target, 4, None)
    rows, one = [row for batch in uninterrupted[:12] for row in batch], [row for batch in phase_one for row in batch]
    boundary = next(i for i, (a, b) in enumerate(zip(rows, one, strict=True)) if a != b)
    assert 100 <= boundary < len(one) - STEP_ROWS  # a shuffle block of 32 samples is fewer rows than 150
    stop = boundary // STEP_ROWS + 2  # in phase 2
    (took,) = {int(m[1]) for line in server.output if f"{CURATED}=4" in line
               for m in [re.search(r"mixture phase: epoch 0 from shuffle block \d+, which starts in row (\d+)", line)]
               if m}  # where it took effect: the first row of that block's tokens
    assert 100 <= took <= boundary
    assert_resumes_and_holds(server, stop, uninterrupted)
