"""The multi-rank examples (torchrun_ddp.py, accelerate_loop.py), run under torchrun as their users run them:
disjoint shares per rank, resume on the same or another number of ranks. One real server for the module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sigil_feed.client import FeedDataset
from tests.conftest import ServerProcess
from tests.integration.examples_support import (
    BATCH,
    SEQ_LEN,
    assert_learns,
    example,
    feed_server,
    losses,
    row_hashes,
    steps,
    torchrun,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The module's server (examples_support.feed_server)."""
    yield from feed_server(tmp_path_factory)


TWO_RANK_STEPS = 20
SAVES = {"torchrun_ddp.py": ("--save-steps", "5", "--save", "ckpt-{step}.pt"),
         "accelerate_loop.py": ("--save-steps", "8", "--save-dir", "state-{step}")}
"""How each example's two-rank run saves as it goes: every 5 steps a checkpoint file, every 8 Accelerate's state."""


@pytest.fixture(scope="module")
def two_rank_run(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[[str], tuple[dict[int, list[float]], Path]]:
    """An example's uninterrupted run of TWO_RANK_STEPS steps on 2 ranks under torchrun, saving as SAVES says: each
    rank's losses and the folder of its --dump and saves. Made once per example, for the test that checks it and the
    test that resumes from its saves (neither example's learning rate depends on --steps, so its first steps are
    those of a shorter run)."""
    runs: dict[str, tuple[dict[int, list[float]], Path]] = {}

    def run(name: str) -> tuple[dict[int, list[float]], Path]:
        if name not in runs:
            folder = tmp_path_factory.mktemp(name.removesuffix(".py"))
            *every, flag, template = SAVES[name]
            runs[name] = losses(torchrun(name, "--target", server.target, "--steps", str(TWO_RANK_STEPS),
                                         "--dump", str(folder), *every, flag, str(folder / template))), folder
        return runs[name]

    return run


@pytest.mark.parametrize("name", ["torchrun_ddp.py", "accelerate_loop.py"])
def test_two_ranks_learn_on_disjoint_shares_picked_up_from_torch_distributed(
        server: ServerProcess, two_rank_run: Callable[[str], tuple[dict[int, list[float]], Path]], name: str) -> None:
    per_rank, folder = two_rank_run(name)
    assert sorted(per_rank) == [0, 1]
    seen = []
    for rank in (0, 1):
        assert_learns(per_rank[rank])
        logged = steps(folder, rank)
        direct = FeedDataset(server.target, batch_size=BATCH, seq_len=SEQ_LEN, rank=rank, world_size=2)
        assert logged == {step: row_hashes(batch["input_ids"])
                          for step, batch in zip(range(TWO_RANK_STEPS), direct, strict=False)}
        seen.append({row for rows in logged.values() for row in rows})
    assert len(seen[0]) == len(seen[1]) == TWO_RANK_STEPS * BATCH and not seen[0] & seen[1]


def global_batches(folder: Path, ranks: int) -> dict[int, list[str]]:
    """Each logged step's global batch: the ranks' rows in global row order (rank r's row i is row r + ranks*i)."""
    per_rank = [steps(folder, rank) for rank in range(ranks)]
    return {step: [rows[i] for i in range(len(per_rank[0][step])) for rows in (r[step] for r in per_rank)]
            for step in per_rank[0]}


def test_torchrun_resumed_on_another_number_of_ranks_trains_on_the_same_global_batches(
        server: ServerProcess, two_rank_run: Callable[[str], tuple[dict[int, list[float]], Path]],
        tmp_path: Path) -> None:
    """2 ranks of 4 rows save after step 5 and train on; 1 rank of 8 rows resumes from that checkpoint: every later
    step trains on exactly the rows the 2 ranks trained on together."""
    full, full_dump = two_rank_run("torchrun_ddp.py")
    assert sorted(full) == [0, 1]
    resumed = torchrun("torchrun_ddp.py", "--target", server.target, "--steps", "12", "--batch-size", str(2 * BATCH),
                       "--resume", str(full_dump / "ckpt-5.pt"), "--dump", str(tmp_path / "after"), ranks=1)
    assert sorted(losses(resumed)) == [0]
    uninterrupted = global_batches(full_dump, 2)
    assert global_batches(tmp_path / "after", 1) == {s: rows for s, rows in uninterrupted.items() if 5 <= s < 12}


@pytest.mark.parametrize("ranks", [1, 2], ids=["single", "torchrun"])
def test_accelerate_resumed_from_save_state_gets_the_batches_of_an_uninterrupted_run(
        server: ServerProcess, two_rank_run: Callable[[str], tuple[dict[int, list[float]], Path]], tmp_path: Path,
        ranks: int) -> None:
    """save_state() at step 8 of an uninterrupted run holds every rank's position; load_state() in new processes
    continues each rank with exactly its next batch."""
    def run(dump: str, *args: str) -> dict[int, list[float]]:
        launcher = example if ranks == 1 else torchrun
        return losses(launcher("accelerate_loop.py", "--target", server.target, "--dump", str(tmp_path / dump),
                               *args))

    if ranks == 1:
        full_dump = tmp_path / "full"
        full = run("full", "--steps", "16", "--save-steps", "8", "--save-dir", str(full_dump / "state-{step}"))
    else:  # the two-rank test's run of 20 steps, saved the same way: its first 16 are this run's
        full, full_dump = two_rank_run("accelerate_loop.py")
    rest = run("resumed", "--steps", "16", "--resume", str(full_dump / "state-8"))
    for rank in range(ranks):
        assert steps(tmp_path / "resumed", rank) == {s: rows for s, rows in steps(full_dump, rank).items()
                                                     if 8 <= s < 16}
        assert rest[rank] == pytest.approx(full[rank][8:16], rel=1e-4)
