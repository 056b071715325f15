"""Exactly once across restarts: SIGKILL mid-epoch, a new process resuming a state_dict, DataLoader workers."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from sigil_feed.client import FeedDataset
from tests.conftest import ServerProcess, rust_pair, write_config, write_jsonl

WORLD = 3
STEPS = 14


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp_path: Path, cached: bool) -> Path:
    write_jsonl(tmp_path / "pairs.jsonl", [rust_pair(i) for i in range(150)])
    return write_config(tmp_path / f"c{cached}.yaml", {
        "names": ["local:pairs.jsonl"], "use_cache": cached, "cache_dir": str(tmp_path / "cache"),
        "shuffle_seed": 3, "shuffle_block": 32}, max_seq_len=64)


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """The streaming (False) and cached (True) configs of one corpus, for the module."""
    folder = tmp_path_factory.mktemp("resume")
    return {cached: config(folder, cached) for cached in (False, True)}


@pytest.fixture(scope="module")
def servers(configs: dict[bool, Path], module_server) -> dict[bool, ServerProcess]:
    """A server for each config (the cached one builds the store), shared by the module's tests that only read."""
    return {cached: module_server(path) for cached, path in configs.items()}


def digest(batch: dict[str, torch.Tensor]) -> str:
    return hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]


def read_ranks(target: str, steps: int, on_step=None) -> list[list[str]]:  # type: ignore[no-untyped-def]
    """STEPS batches for each of WORLD ranks, read concurrently, as digests."""
    out: list[list[str]] = [[] for _ in range(WORLD)]

    def run(rank: int) -> None:
        ds = FeedDataset(target, batch_size=2, rank=rank, world_size=WORLD, prefetch=2, reconnect_deadline_s=120)
        for step, batch in enumerate(ds):
            out[rank].append(digest(batch))
            if on_step:
                on_step(rank, step)
            if step + 1 == steps:
                break

    threads = [threading.Thread(target=run, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


@pytest.mark.parametrize("cached", [False, True], ids=["streaming", "cached"])
def test_sigkill_mid_epoch_loses_and_repeats_nothing(configs: dict[bool, Path], servers: dict[bool, ServerProcess],
                                                    start_server, cached: bool) -> None:
    cfg = configs[cached]
    reference = read_ranks(servers[cached].target, STEPS)
    assert len({d for rank in reference for d in rank}) == WORLD * STEPS  # ranks disjoint

    port = free_port()
    server = start_server(cfg, "--port", str(port))
    killed = threading.Event()

    def kill_midway(rank: int, step: int) -> None:
        if rank == 0 and step == STEPS // 2 and not killed.is_set():
            killed.set()
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
            time.sleep(0.5)
            start_server(cfg, "--port", str(port))

    assert read_ranks(f"127.0.0.1:{port}", STEPS, kill_midway) == reference
    assert killed.is_set()


RESUME_SCRIPT = """
import hashlib, json, sys, torch
from sigil_feed.client import FeedDataset
target, state_file, mode, steps = sys.argv[1:5]
ds = FeedDataset(target, batch_size=2)
if mode == "resume":
    ds.load_state_dict(torch.load(state_file))
seen = []
for step, batch in enumerate(ds):
    seen.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12])
    if step + 1 == int(steps):
        break
if mode == "save":
    torch.save(ds.state_dict(), state_file)
print(json.dumps(seen))
"""


def test_state_dict_resumes_in_a_new_process(tmp_path: Path, servers: dict[bool, ServerProcess]) -> None:
    target = servers[False].target
    state = tmp_path / "state.pt"

    def run(mode: str, steps: int) -> list[str]:
        out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, target, str(state), mode, str(steps)],
                             capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    full = run("full", 12)
    assert run("save", 5) == full[:5]
    assert run("resume", 7) == full[5:]


def test_dataloader_workers_split_the_rank_and_resume_with_stateful_dataloader(
        servers: dict[bool, ServerProcess]) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    target = servers[True].target

    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(FeedDataset(target, batch_size=2, rank=1, world_size=2), batch_size=None,
                                  num_workers=2)

    full_loader = loader()
    full = [digest(b) for _, b in zip(range(16), full_loader, strict=False)]
    assert len(set(full)) == 16  # the two workers never overlap
    first = loader()
    it = iter(first)
    head = [digest(next(it)) for _ in range(6)]
    state = first.state_dict()
    del it, first
    resumed = loader()
    resumed.load_state_dict(state)
    tail = [digest(b) for _, b in zip(range(10), resumed, strict=False)]
    assert head + tail == full
    assert Counter(head + tail) == Counter(full)
