"""A source added to `names`, or one removed, at an epoch boundary, through the real server and client: a checkpoint
taken at the end of an epoch resumes under the new source list, and the next epoch is exactly the one a run of
the new configuration serves; a checkpoint taken inside an epoch is refused, saying why and what to do."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from sigil_feed.client import BatchStream, EpochEnd, FeedBatch, FeedDataset
from sigil_feed.client.integrations.ranks import resume_state
from sigil_feed.client.stream import FeedServerError
from tests.conftest import rust_pair, write_config, write_jsonl
from tests.integration.test_elastic import STEP_ROWS, read

BROAD, CURATED, EXTRA = "local:broad/*.jsonl", "local:curated.jsonl", "local:extra.jsonl"
Batches = list[list[str]]


def config(tmp_path: Path, cached: bool, names: list[str], name: str) -> Path:
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
        "stopping_strategy": "all_exhausted"}, max_seq_len=64)


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
    before, cursors, (end, _) = epochs(old.target)
    _, at_last_step = read(old.target, 4, len(before[0]))  # 4 ranks after epoch 0's last step
    old.stop()
    for names in ([BROAD, CURATED, EXTRA], [BROAD]):
        new = start_server(config(tmp_path, cached, names, f"new{len(names)}.yaml"))
        fresh, _, _ = epochs(new.target)
        resumed, _, _ = epochs(new.target, end)  # the EpochEnd cursor: the next epoch over the new sources
        assert resumed == {1: fresh[1]} and fresh[1] != before[1]
        assert any(f"epoch 1 from its start: sources now {', '.join(names)}" in line for line in new.output)
        with pytest.raises(FeedServerError, match="sources change only at an epoch boundary") as err:
            epochs(new.target, cursors[0][2])  # inside epoch 0
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        if cached:  # the cursor of the epoch's last step (what a checkpoint holds) resumes there too, on 3 ranks
            assert read(new.target, 3, None, at_last_step)[0] == fresh[1]
        else:  # streaming learns the epoch ended only past its last step: that cursor is inside it
            with pytest.raises(FeedServerError, match="sources change only at an epoch boundary"):
                read_first(new.target, at_last_step)
        new.stop()


def read_first(target: str, states: list[Any]) -> None:
    """Open a rank's stream from `states` and take one batch (raises what the server answers)."""
    ds = FeedDataset(target, batch_size=STEP_ROWS)
    ds.load_state_dict(resume_state(states, 0, 1))
    next(iter(ds))
