"""DataLoader worker processes started by spawn and forkserver are refused under Accelerate's loader wrappers and
read their own rank's streams, exactly as forked ones do (they see neither the parent's stack nor its process
group)."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.utils.data import DataLoader

from sigil_feed.client import FeedDataset
from tests.conftest import ServerProcess, batch_digest, rust_pair, write_config, write_jsonl
from tests.integration.examples_support import assert_closed

CONTEXTS = ["fork", "spawn", "forkserver"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder: Path = tmp_path_factory.mktemp("workers")
    write_jsonl(folder / "pairs.jsonl", [rust_pair(i) for i in range(200)])
    server = ServerProcess(write_config(folder / "feed.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False}))
    yield server
    server.stop()


@pytest.mark.filterwarnings("ignore:.*pickle error.*:UserWarning", "ignore:.*fork.*:DeprecationWarning")
@pytest.mark.parametrize("dispatch", [True, False], ids=["dispatch", "shard"])
@pytest.mark.parametrize("context", CONTEXTS)
def test_a_prepared_loader_with_workers_is_refused_whatever_starts_them(server: ServerProcess, context: str,
                                                                         dispatch: bool) -> None:
    """Before: only forked workers were refused (they inherit the stack that runs Accelerate's wrapper); spawn and
    forkserver workers streamed, and under dispatch_batches every rank trained on rank 0's workers' streams."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=dispatch))
    loader = accelerator.prepare(DataLoader(FeedDataset(server.target, batch_size=2), batch_size=None,
                                            num_workers=2, multiprocessing_context=context))
    with pytest.raises(TypeError, match="Prepare only the model and optimizer") as refused:
        next(iter(loader))
    # torch re-raises a worker's error from a frame that holds the loader's iterator in a reference cycle; left to
    # the garbage collector, its queues close before its workers are told to stop, and each worker waits out
    # torch's 5 s join. Freed here, it stops them at once.
    traceback.clear_frames(refused.tb)
    assert_closed(server.target)


@pytest.mark.parametrize("context", CONTEXTS)
def test_workers_split_the_rank_of_the_process_group_whatever_starts_them(
        server: ServerProcess, context: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 (a process group, no RANK/WORLD_SIZE in the environment, as under mp.spawn launchers) with two
    workers reads ranks 2 and 3 of 4. Before: spawned workers found no process group and read ranks 0 and 1."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        loader = DataLoader(FeedDataset(server.target, batch_size=2), batch_size=None, num_workers=2,
                            multiprocessing_context=context)
        got = [batch_digest(batch) for _, batch in zip(range(4), loader, strict=False)]
    finally:
        dist.destroy_process_group()
    direct = [[batch_digest(batch) for _, batch in
               zip(range(2), FeedDataset(server.target, batch_size=2, rank=rank, world_size=4), strict=False)]
              for rank in (2, 3)]
    assert got == [direct[0][0], direct[1][0], direct[0][1], direct[1][1]]  # the workers take turns
