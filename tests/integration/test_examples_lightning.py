"""examples/lightning_fit.py, run as its users run it on one device and on two (DDP): resumed from a checkpoint,
every rank trains on exactly the batches of an uninterrupted run. One real server for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.integration.examples_support import (
    assert_learns,
    example,
    feed_server,
    losses,
    steps,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The module's server (examples_support.feed_server)."""
    yield from feed_server(tmp_path_factory)


@pytest.mark.parametrize("devices", [1, 2], ids=["single", "ddp"])
def test_lightning_resumed_from_a_checkpoint_gets_the_batches_of_an_uninterrupted_run(
        server: ServerProcess, tmp_path: Path, devices: int) -> None:
    """fit(ckpt_path=...) from the step-10 checkpoint of an uninterrupted run, in a new process: every rank trains
    on exactly the batches the run trained on after it (Lightning has already fetched step 11's batch when it writes
    the checkpoint)."""
    def fit(out: str, dump: str, *args: str) -> dict[int, list[float]]:
        return losses(example("lightning_fit.py", "--target", server.target, "--devices", str(devices),
                              "--steps", "24", "--save-steps", "10", "--output-dir", str(tmp_path / out),
                              "--dump", str(tmp_path / dump), *args))

    full = fit("full", "full-log")
    resumed = fit("resumed", "after", "--resume", str(tmp_path / "full" / "epoch=0-step=10.ckpt"))
    assert sorted(full) == sorted(resumed) == list(range(devices))
    for rank in range(devices):
        assert_learns(full[rank])
        uninterrupted = steps(tmp_path / "full-log", rank)
        assert steps(tmp_path / "after", rank) == {s: rows for s, rows in uninterrupted.items() if s >= 10}
        assert resumed[rank] == pytest.approx(full[rank][10:], rel=1e-4)
