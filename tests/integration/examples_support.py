"""What the examples' tests share: one real server per test module on a small repetitive corpus, and running
examples/ as their users run them (one torch thread each), reading the losses and row hashes they report.

The tests are in three files, so two pytest-xdist workers share them: test_examples.py (single-process loops and the
client behaviour they rely on), test_examples_lightning.py, test_examples_ranks.py (torchrun and accelerate).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import REPO, ServerProcess, rust_pair, write_config, write_jsonl

EXAMPLES = REPO / "examples"

SEQ_LEN, BATCH = 64, 4
COMMON = ("--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH))


def feed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A test module's server (its `server` fixture yields from this): 400 near-identical Rust pairs, packed into
    rows of 64, shuffled, endless; plus an unpacked copy."""
    folder = tmp_path_factory.mktemp("feed")
    write_jsonl(folder / "pairs.jsonl", [rust_pair(i) for i in range(400)])
    config = write_config(folder / "feed.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False,
                                                 "shuffle_seed": 1},
                          max_seq_len=SEQ_LEN, server={"datasets": {"padded": {"pack": False}}})
    server = ServerProcess(config)
    yield server
    server.stop()


def tiny_causal_lm(info: feed_pb2.DatasetInfo, seq_len: int) -> torch.nn.Module:
    """examples/common.py's tiny model, imported at the first call: it imports transformers' GPT-2, which every
    pytest-xdist worker would otherwise import while collecting."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    from common import tiny_causal_lm as examples_model

    return examples_model(info, seq_len)


def launch(*cmd: str) -> subprocess.Popen[str]:
    """Start an example (one torch thread each, so two can share the CPUs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def losses(proc: subprocess.Popen[str]) -> dict[int, list[float]]:
    """Wait for an example to succeed; the losses each rank printed on its RESULT line."""
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    results = [json.loads(line.removeprefix("RESULT ")) for line in stdout.splitlines()
               if line.startswith("RESULT ")]
    return {r["rank"]: r["losses"] for r in results}


def example(name: str, *args: str) -> subprocess.Popen[str]:
    """python examples/<name> ARGS."""
    return launch(sys.executable, str(EXAMPLES / name), *COMMON, *args)


def torchrun(name: str, *args: str, ranks: int = 2) -> subprocess.Popen[str]:
    """torchrun --nproc-per-node RANKS examples/<name> ARGS, on a free rendezvous port."""
    return launch(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                  str(EXAMPLES / name), *COMMON, *args)


def steps(folder: Path, rank: int = 0) -> dict[int, list[str]]:
    """The row hashes an example logged with --dump, by training step."""
    lines = (folder / f"rank{rank}.jsonl").read_text().splitlines()
    return {entry["step"]: entry["rows"] for entry in map(json.loads, lines)}


def row_hashes(input_ids: torch.Tensor) -> list[str]:
    """The hashes examples/common.py BatchLog writes for a batch."""
    return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in input_ids.numpy()]


def assert_learns(losses: list[float]) -> None:
    """Finite throughout, and clearly lower at the end than at the start."""
    assert len(losses) >= 20 and all(math.isfinite(x) for x in losses), losses
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def stream_clients(target: str) -> int:
    """Streams the server counts as connected, over all datasets."""
    with grpc.insecure_channel(target) as channel:
        stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=10)
    return sum(len(dataset.clients) for dataset in stats.datasets)


def feed_threads() -> list[str]:
    """The client's receiving threads still alive in this process."""
    return [t.name for t in threading.enumerate() if t.name.startswith("sigil-feed-")]


def assert_closed(target: str) -> None:
    """The server saw the stream end and the receiving thread is gone (within a few seconds)."""
    deadline = time.monotonic() + 10
    while (stream_clients(target) or feed_threads()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stream_clients(target) == 0 and feed_threads() == []
