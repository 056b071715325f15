"""Is training input-bound? Real servers and FeedDataset loops; the server's numbers against the test's own clock."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from sigil_feed.client.dataset import FeedDataset
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import ServerProcess, rust_pair, write_config, write_jsonl

AGREE = 0.06  # the server's fraction may differ from the test's by this much (absolute): the test also times the
#               conversion to tensors, which the client does not count as data wait (0.042 seen at load average 10)


@dataclass
class Clock:
    """The test's own view of its loop: when it asked for each batch and when it got it."""

    asked: list[float] = field(default_factory=list)
    got: list[float] = field(default_factory=list)

    def fraction(self, steps: int) -> tuple[float, float]:
        """(wait / step time, step time) over the first `steps` steps (the first batch only starts the clock)."""
        wait = sum(self.got[i] - self.asked[i] for i in range(1, steps + 1))
        step = self.got[steps] - self.got[0]
        return wait / step, step


def run_loop(batches: Iterator[object], clock: Clock, *, steps: int, min_s: float, sleep_s: float) -> None:
    """A training loop that computes for `sleep_s` per step, for `steps` steps and at least `min_s` seconds."""
    start = time.perf_counter()
    while len(clock.got) <= steps or time.perf_counter() - start < min_s:
        clock.asked.append(time.perf_counter())
        next(batches)
        clock.got.append(time.perf_counter())
        time.sleep(sleep_s)


def client_view(server: ServerProcess, client_id: str, at_least: int) -> tuple[feed_pb2.ClientStats,
                                                                                feed_pb2.DatasetStats]:
    """The client's stats once it has reported `at_least` steps (reports ride on credits, up to 2 a second)."""
    deadline = time.monotonic() + 30
    with grpc.insecure_channel(server.target) as channel:
        stub = feed_pb2_grpc.DataFeedStub(channel)
        while True:
            (dataset,) = stub.GetStats(feed_pb2.GetStatsRequest(dataset="default"), timeout=10).datasets
            clients = [c for c in dataset.clients if c.client_id == client_id]
            if clients and clients[0].input_bound.steps >= at_least:
                return clients[0], dataset
            assert time.monotonic() < deadline, f"{client_id} reported {clients and clients[0].input_bound}"
            time.sleep(0.2)


def check_agrees(reported: feed_pb2.InputBound, clock: Clock) -> float:
    """The server's since-start fraction and step time match the test's over the steps it was told about."""
    own, step_s = clock.fraction(reported.steps)
    assert reported.reported and abs(reported.fraction_total - own) <= AGREE, (reported.fraction_total, own)
    assert reported.step_s == pytest.approx(step_s, rel=0.03)
    assert sum(b.count for b in reported.wait_histogram) == reported.steps
    return own


def warnings(server: ServerProcess) -> list[dict]:
    """The input-bound warnings the server logged (as JSON lines)."""
    logs = [json.loads(line) for line in list(server.output) if line.startswith("{")]
    return [r for r in logs if r["level"] == "WARNING" and "input-bound" in r["msg"]]


def test_a_loop_slower_than_a_fast_server_is_not_input_bound(tmp_path: Path, start_server) -> None:
    write_jsonl(tmp_path / "pairs.jsonl", [rust_pair(i) for i in range(400)])
    config = write_config(tmp_path / "trainer.yaml", {"names": ["local:pairs.jsonl"], "use_cache": True,
                                                      "cache_dir": str(tmp_path / "cache")},
                          server={"input_bound": {"threshold": 0.5, "window_s": 2}})
    server = start_server(config, "--log-json")
    batches = iter(FeedDataset(server.target, batch_size=2, seq_len=64, client_id="fast-loop"))
    clock = Clock()
    run_loop(batches, clock, steps=300, min_s=3.0, sleep_s=0.010)
    client, dataset = client_view(server, "fast-loop", at_least=100)
    own = check_agrees(client.input_bound, clock)
    assert own < 0.1 and client.input_bound.fraction_1m < 0.1, (own, client.input_bound.fraction_1m)
    assert client.input_bound.steps_per_s == pytest.approx(client.input_bound.steps / client.input_bound.step_s)
    assert 20 < client.input_bound.steps_per_s < 101  # 10 ms of compute per step caps it at 100
    (job,) = dataset.jobs
    assert (job.world_size, list(job.ranks), job.input_bound.slowest_client) == (1, [0], "fast-loop")
    batches.close()  # type: ignore[attr-defined]
    assert warnings(server) == []


def test_a_server_slower_than_the_loop_reports_a_high_fraction_and_warns_once(tmp_path: Path,
                                                                               start_server) -> None:
    # streaming mode with long samples on the HF encoder: each tokenized chunk (about 1 Mi characters) takes the
    # server far longer than the loop needs to consume the batches it yields
    long = [{**rust_pair(i), "gen": f"    let v{i} = {i} * x + y;\n" * 400} for i in range(300)]
    write_jsonl(tmp_path / "pairs.jsonl", long)
    config = write_config(tmp_path / "trainer.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False,
                                                      "shuffle_block": 64, "tokenizer_backend": "hf"},
                          server={"input_bound": {"threshold": 0.1, "window_s": 2}}, max_seq_len=2048)
    server = start_server(config, "--log-json")
    clocks = {rank: Clock() for rank in (0, 1)}
    streams = {rank: iter(FeedDataset(server.target, batch_size=4, rank=rank, world_size=2,
                                      client_id=f"slow-rank{rank}")) for rank in (0, 1)}
    loops = [threading.Thread(target=run_loop, args=(streams[rank], clocks[rank]),
                              kwargs={"steps": 40, "min_s": 6.0, "sleep_s": sleep_s})
             for rank, sleep_s in ((0, 0.030), (1, 0.001))]
    for loop in loops:
        loop.start()
    for loop in loops:
        loop.join(timeout=120)
    views = {rank: client_view(server, f"slow-rank{rank}", at_least=20) for rank in (0, 1)}
    owns = {rank: check_agrees(views[rank][0].input_bound, clocks[rank]) for rank in (0, 1)}
    assert owns[1] > 0.3 and views[1][0].input_bound.fraction_1m > 0.3, owns  # 0.48 seen at load average 6
    (job,) = views[1][1].jobs
    assert (job.world_size, list(job.ranks)) == (2, [0, 1])
    assert (job.input_bound.slowest_rank, job.input_bound.slowest_client) == (1, "slow-rank1")
    for batches in streams.values():
        batches.close()  # type: ignore[attr-defined]
    (warning,) = warnings(server)
    assert warning["dataset"] == "default" and warning["world_size"] == 2 and 1 in warning["ranks"]
    assert "streaming tokenization slower than consumption" in warning["cause"], warning
