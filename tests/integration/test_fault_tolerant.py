"""A replica group that restarts while the others train on (torchft's fault-tolerant data parallelism) resumes at
the same global row as its peers, through the real server and client.

torchft itself is not used: each replica group is simulated as torchft's Manager drives it (a step counter that
counts committed steps; at a quorum the rejoining replica receives the healthy replica's user state dict, serialised
with torch.save as torchft's HTTP checkpoint transport does, and torchft's own step), in both of torchft's orders:
a synchronous quorum heals before the step's batch is fetched; an asynchronous one after the rejoining replica has
fetched a batch and sat the step out, at the step's commit."""

from __future__ import annotations

import hashlib
import io
import time
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from sigil_feed.client import FeedDataset
from sigil_feed.client.integrations.fault_tolerant import StepFeed
from tests.integration.test_elastic import config

REPLICAS, LOCAL, BATCH = 2, 2, 3  # 2 replica groups of 2 ranks: ranks 0-1 and 2-3 of 4, 12 rows a step
WORLD = REPLICAS * LOCAL
STEPS = 14


def digest(batch: dict[str, Any]) -> str:
    return hashlib.blake2b(batch["input_ids"].numpy().tobytes(), digest_size=12).hexdigest()


def transfer(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict through torch.save/torch.load(weights_only=True), as torchft's HTTP transport carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class Replica:
    """One replica group: its ranks' StepFeeds on one step counter, which counts committed steps as torchft's
    Manager does."""

    def __init__(self, target: str, replica: int) -> None:
        self.step = 0
        self.feeds = [StepFeed(FeedDataset(target, batch_size=BATCH, rank=replica * LOCAL + j, world_size=WORLD,
                                           prefetch=2), lambda: self.step) for j in range(LOCAL)]

    def batches(self) -> list[str]:
        """Every rank's batch of the step in progress."""
        return [digest(feed.batch()) for feed in self.feeds]

    def heal_from(self, healthy: Replica) -> None:
        """What a quorum that heals this replica does: each rank loads the state of the healthy replica's rank of
        the same group rank, and the step counter becomes the healthy replica's."""
        for mine, theirs in zip(self.feeds, healthy.feeds, strict=True):
            mine.load_state_dict(transfer({"data": theirs.state_dict()})["data"])
        self.step = healthy.step

    def close(self) -> None:
        for feed in self.feeds:
            feed.close()


@pytest.mark.filterwarnings("ignore::sigil_feed.client.PackedAttentionWarning")  # no model here to check
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streaming"])
def test_a_replica_that_rejoins_resumes_at_the_global_row_of_its_peers(tmp_path: Path, start_server,
                                                                      cached: bool) -> None:
    """Replicas A (ranks 0-1) and B (2-3) of 4 train 3 steps; B dies; A trains 3 steps alone; a fresh B heals from
    A at a synchronous quorum: from then on every rank's batch is the uninterrupted run's of that step, and a step
    that does not commit is retried on the same batches. B dies again; A trains on; a fresh B fetches a batch first
    (its own stale position: the rows of step 0) and heals at the commit of a step it sat out (asynchronous quorum):
    from the next step on it is on the uninterrupted run's rows again."""
    server = start_server(config(tmp_path, cached))
    reference = []
    for rank in range(WORLD):
        ds = FeedDataset(server.target, batch_size=BATCH, rank=rank, world_size=WORLD, prefetch=2)
        reference.append([digest(batch) for batch in islice(ds, STEPS)])
    expected = [[reference[rank][step] for rank in range(WORLD)] for step in range(STEPS)]
    assert len({h for step in expected for h in step}) == STEPS * WORLD  # every batch distinct

    a, b = Replica(server.target, 0), Replica(server.target, 1)
    for step in range(3):
        assert a.batches() + b.batches() == expected[step]
        a.step, b.step = a.step + 1, b.step + 1
    b.close()  # replica B's processes die
    for step in range(3, 6):
        assert a.batches() == expected[step][:LOCAL]
        a.step += 1

    b = Replica(server.target, 1)  # restarted: a fresh dataset at the start of the epoch, torchft's step 0
    b.heal_from(a)  # synchronous quorum at the start of step 6, before any batch is fetched
    for step in range(6, 9):
        assert a.batches() + b.batches() == expected[step]
        if step == 7:  # should_commit said no: the step is retried, on the same rows
            assert a.batches() + b.batches() == expected[step]
        a.step, b.step = a.step + 1, b.step + 1
    b.close()
    for step in range(9, 11):
        assert a.batches() == expected[step][:LOCAL]
        a.step += 1

    b = Replica(server.target, 1)
    assert b.batches() == expected[0][LOCAL:]  # fetched before the quorum: the rows of step 0, not of step 11
    before = [feed.state_dict() for feed in a.feeds]
    assert a.batches() == expected[11][:LOCAL]  # A fetches step 11's batch while the quorum runs
    assert [feed.state_dict() for feed in a.feeds] == before  # either way it hands over where step 11 starts
    b.heal_from(a)  # at step 11's commit; B sat step 11 out
    a.step, b.step = a.step + 1, b.step + 1
    for step in range(12, STEPS):
        assert a.batches() + b.batches() == expected[step]
        a.step, b.step = a.step + 1, b.step + 1
    a.close()
    b.close()


class ReplicaDied(Exception):
    """The failure injected into a replica group."""


def torchft_replica(target: str, replica: int, lighthouse: str, steps: int, die_at: int | None, pause_s: float,
                    trained: list[tuple[int, str]]) -> None:
    """One replica group of one rank under a real torchft Manager (gloo, CPU): a tiny model trains on
    StepFeed's batches until `steps` steps are committed, `pause_s` a step; each committed step it took part in is
    appended to `trained` as (step, batch digest). With `die_at`, the group raises after committing that many
    steps."""
    import torch.distributed as dist
    from torch import nn
    from torchft import Manager, ProcessGroupGloo
    from torchft.ddp import DistributedDataParallel
    from torchft.optim import OptimizerWrapper

    store = dist.TCPStore(host_name="localhost", port=0, is_master=True, wait_for_workers=False)
    model = nn.Linear(64, 1)
    feed_holder: list[StepFeed] = []
    manager = Manager(pg=ProcessGroupGloo(), min_replica_size=1, replica_id=str(replica),
                      store_addr="localhost", store_port=store.port, rank=0, world_size=1, lighthouse_addr=lighthouse,
                      state_dict=lambda: {"model": model.state_dict(), "data": feed_holder[0].state_dict()},
                      load_state_dict=lambda s: (model.load_state_dict(s["model"]),
                                                 feed_holder[0].load_state_dict(s["data"])))
    feed = StepFeed(FeedDataset(target, batch_size=BATCH, rank=replica, world_size=REPLICAS, prefetch=2),
                    manager.current_step)
    feed_holder.append(feed)
    ddp = DistributedDataParallel(manager, model)
    optimizer = OptimizerWrapper(manager, torch.optim.SGD(model.parameters(), lr=1e-3))
    try:
        while manager.current_step() < steps:
            optimizer.zero_grad()  # the quorum starts; a restarted replica heals
            batch = feed.batch()
            step, taking_part = manager.current_step(), manager.is_participating()
            ddp(batch["input_ids"].float()).mean().backward()
            optimizer.step()  # commits (or not)
            if manager.current_step() == step + 1 and taking_part:
                trained.append((step, digest(batch)))
            if die_at is not None and manager.current_step() == die_at:
                raise ReplicaDied
            time.sleep(pause_s)
    finally:
        feed.close()
        manager.shutdown(wait=False)


@pytest.mark.filterwarnings("ignore::sigil_feed.client.PackedAttentionWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_with_torchft_a_restarted_replica_group_trains_on_its_peers_rows(tmp_path: Path, start_server) -> None:
    """Two replica groups of one rank under torchft's Manager and Lighthouse (in this process, threads); group 1
    dies after 3 steps and restarts (a fresh Manager at step 0, a fresh FeedDataset at the epoch's start) while
    group 0 trains on alone (min_replica_size 1), heals from it and trains to step 12: every step either group
    committed and took part in trained on the uninterrupted run's rows of that step for its rank. Not in the default
    suite: torchft is no dependency of the project (`pip install torchft` to run it)."""
    pytest.importorskip("torchft")
    import threading

    from torchft._torchft import LighthouseServer

    steps = 12
    server = start_server(config(tmp_path, True))
    expected = [[digest(b) for b in islice(FeedDataset(server.target, batch_size=BATCH, rank=rank,
                                                      world_size=REPLICAS, prefetch=2), steps)]
                for rank in range(REPLICAS)]
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1)
    trained: list[list[tuple[int, str]]] = [[], [], []]  # group 0; group 1 before it dies, after its restart
    errors: list[BaseException] = []

    def group(replica: int, die_at: int | None) -> None:
        pause = 0.3 if replica == 0 else 0.0  # group 0 is still training when group 1 is back
        try:
            torchft_replica(server.target, replica, lighthouse.address(), steps, die_at, pause, trained[replica])
        except ReplicaDied:
            torchft_replica(server.target, replica, lighthouse.address(), steps, None, pause, trained[2])
        except BaseException as err:
            errors.append(err)

    try:
        threads = [threading.Thread(target=group, args=(0, None)), threading.Thread(target=group, args=(1, 3))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        assert not errors, errors
    finally:
        lighthouse.shutdown()
    for run, replica in ((0, 0), (1, 1), (2, 1)):
        assert [h for _, h in trained[run]] == [expected[replica][s] for s, _ in trained[run]], run
    assert trained[0][-1][0] == steps - 1  # (a group joining at step 0 may sit it out while the other heals it)
    assert all(s <= 2 for s, _ in trained[1])  # group 1 died after committing step 2
    restarted = [s for s, _ in trained[2]]
    assert restarted[0] > 3 and restarted == list(range(restarted[0], steps))  # it healed mid-run, then kept up
