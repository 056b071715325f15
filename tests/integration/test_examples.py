"""The examples/ training loops, run as their users run them, and the client behaviour they rely on.

One real server for the module, on a small repetitive corpus; every example trains a tiny GPT-2 on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sigil_feed.client import FeedConnectionError, FeedDataset
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import REPO, ServerProcess, rust_pair, write_config, write_jsonl

EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
from common import tiny_causal_lm  # noqa: E402  (examples/common.py: the examples' tiny model)

SEQ_LEN, BATCH = 64, 4
COMMON = ("--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """400 near-identical Rust pairs, packed into rows of 64, shuffled, endless; plus an unpacked copy."""
    folder = tmp_path_factory.mktemp("feed")
    write_jsonl(folder / "pairs.jsonl", [rust_pair(i) for i in range(400)])
    config = write_config(folder / "feed.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False,
                                                 "shuffle_seed": 1},
                          max_seq_len=SEQ_LEN, server={"datasets": {"padded": {"pack": False}}})
    server = ServerProcess(config)
    yield server
    server.stop()


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


def test_plain_loop_learns_and_resumes_with_exactly_the_next_batch(server: ServerProcess, tmp_path: Path) -> None:
    checkpoint = str(tmp_path / "ckpt.pt")
    full = example("plain_pytorch.py", "--target", server.target, "--steps", "30", "--dump", str(tmp_path / "a"))
    cut = example("plain_pytorch.py", "--target", server.target, "--steps", "12", "--save", checkpoint,
                  "--dump", str(tmp_path / "b"))
    full_losses, first = losses(full)[0], losses(cut)[0]
    rest = losses(example("plain_pytorch.py", "--target", server.target, "--steps", "30", "--resume", checkpoint,
                          "--dump", str(tmp_path / "b")))[0]
    assert_learns(full_losses)
    assert steps(tmp_path / "b") == steps(tmp_path / "a")
    assert first + rest == pytest.approx(full_losses, rel=1e-4)


@pytest.mark.parametrize("name", ["hf_trainer.py", "trl_sft.py"])
def test_trainer_resumed_from_a_checkpoint_gets_the_batches_of_an_uninterrupted_run(
        server: ServerProcess, tmp_path: Path, name: str) -> None:
    """FeedTrainer and FeedSFTTrainer: stopped at step 10, resumed in a new process from the newest complete
    checkpoint (a later one whose feed position is missing, as after a kill while saving, is passed over)."""
    def trainer(out: str, *args: str) -> subprocess.Popen[str]:
        return example(name, "--target", server.target, "--steps", "24", "--save-steps", "8",
                       "--output-dir", str(tmp_path / out), *args)

    full = trainer("full", "--dump", str(tmp_path / "full-log"))
    cut = trainer("cut", "--stop-at", "10", "--dump", str(tmp_path / "before"))
    full_losses, _ = losses(full)[0], losses(cut)
    assert sorted(p.parent.name for p in (tmp_path / "cut").glob("*/sigil_feed_rank0.pt")) == [
        "checkpoint-10", "checkpoint-8"]
    torn = tmp_path / "cut" / "checkpoint-11"
    shutil.copytree(tmp_path / "cut" / "checkpoint-10", torn)
    (torn / "sigil_feed_rank0.pt").unlink()
    resumed = losses(trainer("cut", "--resume", "--dump", str(tmp_path / "after")))[0]
    assert_learns(full_losses)
    uninterrupted = steps(tmp_path / "full-log")
    after = steps(tmp_path / "after")
    assert sorted(after) == list(range(10, 24))
    assert after == {step: rows for step, rows in uninterrupted.items() if step >= 10}
    assert steps(tmp_path / "before") == {step: rows for step, rows in uninterrupted.items() if step < 10}
    assert resumed == pytest.approx(full_losses, rel=1e-4)  # its log_history carries the first 10 over


@pytest.mark.parametrize("devices", [1, 2], ids=["single", "ddp"])
def test_lightning_resumed_from_a_checkpoint_gets_the_batches_of_an_uninterrupted_run(
        server: ServerProcess, tmp_path: Path, devices: int) -> None:
    """fit(ckpt_path=...) after a run stopped at step 10: every rank trains on exactly the batches it would
    have (Lightning has already fetched step 11's batch when it writes the checkpoint)."""
    def fit(out: str, dump: str, *args: str) -> dict[int, list[float]]:
        return losses(example("lightning_fit.py", "--target", server.target, "--devices", str(devices),
                              "--save-steps", "10", "--output-dir", str(tmp_path / out),
                              "--dump", str(tmp_path / dump), *args))

    full = fit("full", "full-log", "--steps", "24")
    fit("cut", "before", "--steps", "10")
    resumed = fit("cut", "after", "--steps", "24", "--resume", str(tmp_path / "cut" / "last.ckpt"))
    assert sorted(full) == sorted(resumed) == list(range(devices))
    for rank in range(devices):
        assert_learns(full[rank])
        uninterrupted = steps(tmp_path / "full-log", rank)
        assert steps(tmp_path / "before", rank) == {s: rows for s, rows in uninterrupted.items() if s < 10}
        assert steps(tmp_path / "after", rank) == {s: rows for s, rows in uninterrupted.items() if s >= 10}
        assert resumed[rank] == pytest.approx(full[rank][10:], rel=1e-4)


def test_trl_batches_reach_the_model_padding_free(server: ServerProcess, tmp_path: Path) -> None:
    """FeedSFTTrainer hands the model the feed's packed rows: position_ids kept, no attention_mask."""
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from sigil_feed.client.integrations.trl import FeedSFTTrainer

    feed = FeedDataset(server.target, batch_size=BATCH, seq_len=SEQ_LEN)
    info = feed.fetch_info()
    model = tiny_causal_lm(info, SEQ_LEN)
    seen: list[set[str]] = []
    model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=2, report_to="none", disable_tqdm=True,
                       save_strategy="no", bf16=False, activation_checkpointing=False)
    FeedSFTTrainer(model=model, args=config, train_dataset=feed,
                   processing_class=AutoTokenizer.from_pretrained(info.tokenizer)).train()
    assert len(seen) == 2
    assert all({"input_ids", "labels", "position_ids"} <= keys and "attention_mask" not in keys for keys in seen)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_stock_trainer_and_a_prepared_loader_fail_naming_the_fix(server: ServerProcess, tmp_path: Path) -> None:
    """Trainer(train_dataset=FeedDataset) names FeedTrainer; accelerator.prepare(loader) names the fix."""
    from accelerate import Accelerator
    from transformers import Trainer, TrainingArguments

    feed = FeedDataset(server.target, batch_size=BATCH, seq_len=SEQ_LEN)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to="none", disable_tqdm=True)
    with pytest.raises(TypeError, match="FeedTrainer"):
        Trainer(model=tiny_causal_lm(feed.fetch_info(), SEQ_LEN), args=args, train_dataset=feed).train()
    loader = Accelerator(cpu=True).prepare(DataLoader(feed, batch_size=None))
    with pytest.raises(TypeError, match="Prepare only the model and optimizer"):
        next(iter(loader))
    assert_closed(server.target)


TWO_RANK_STEPS = 20


@pytest.fixture(scope="module")
def two_rank_run(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[[str], tuple[dict[int, list[float]], Path]]:
    """An example's uninterrupted run of TWO_RANK_STEPS steps on 2 ranks under torchrun: each rank's losses and the
    folder of its --dump. Made once per example, for the test that checks it and the test that resumes against it
    (neither example's learning rate depends on --steps, so its first steps are those of a shorter run)."""
    runs: dict[str, tuple[dict[int, list[float]], Path]] = {}

    def run(name: str) -> tuple[dict[int, list[float]], Path]:
        if name not in runs:
            folder = tmp_path_factory.mktemp(name.removesuffix(".py"))
            runs[name] = losses(torchrun(name, "--target", server.target, "--steps", str(TWO_RANK_STEPS),
                                         "--dump", str(folder))), folder
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
    """2 ranks of 4 rows stop after step 5 and save; 1 rank of 8 rows resumes: every later step trains on exactly
    the rows the 2 ranks would have trained on together."""
    checkpoint = str(tmp_path / "ckpt.pt")
    full, full_dump = two_rank_run("torchrun_ddp.py")
    cut = torchrun("torchrun_ddp.py", "--target", server.target, "--steps", "5", "--save", checkpoint)
    assert sorted(full) == sorted(losses(cut)) == [0, 1]
    resumed = torchrun("torchrun_ddp.py", "--target", server.target, "--steps", "12", "--batch-size", str(2 * BATCH),
                       "--resume", checkpoint, "--dump", str(tmp_path / "after"), ranks=1)
    assert sorted(losses(resumed)) == [0]
    uninterrupted = global_batches(full_dump, 2)
    assert global_batches(tmp_path / "after", 1) == {s: rows for s, rows in uninterrupted.items() if 5 <= s < 12}


@pytest.mark.parametrize("ranks", [1, 2], ids=["single", "torchrun"])
def test_accelerate_resumed_from_save_state_gets_the_batches_of_an_uninterrupted_run(
        server: ServerProcess, two_rank_run: Callable[[str], tuple[dict[int, list[float]], Path]], tmp_path: Path,
        ranks: int) -> None:
    """save_state() at step 8 holds every rank's position; load_state() in new processes continues each rank
    with exactly its next batch."""
    def run(dump: str, *args: str) -> dict[int, list[float]]:
        launcher = example if ranks == 1 else torchrun
        return losses(launcher("accelerate_loop.py", "--target", server.target, "--dump", str(tmp_path / dump),
                               *args))

    if ranks == 1:
        full, full_dump = run("full", "--steps", "16"), tmp_path / "full"
    else:  # the two-rank test's run of 20 steps: its first 16 are this run's
        full, full_dump = two_rank_run("accelerate_loop.py")
    first = run("cut", "--steps", "8", "--save-dir", str(tmp_path / "state"))
    rest = run("cut", "--steps", "16", "--resume", str(tmp_path / "state"))
    for rank in range(ranks):
        assert steps(tmp_path / "cut", rank) == {s: rows for s, rows in steps(full_dump, rank).items() if s < 16}
        assert first[rank] + rest[rank] == pytest.approx(full[rank][:16], rel=1e-4)


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


def test_break_and_exceptions_in_the_loop_close_the_stream(server: ServerProcess) -> None:
    loader = DataLoader(FeedDataset(server.target, batch_size=2), batch_size=None)
    for step, _batch in enumerate(loader):
        if step == 0:
            assert stream_clients(server.target) == 1 and len(feed_threads()) == 1
        if step == 3:
            break
    assert_closed(server.target)
    with pytest.raises(RuntimeError, match="loss is nan"):
        for step, _batch in enumerate(loader):
            if step == 3:
                raise RuntimeError("loss is nan")
    assert_closed(server.target)


def test_unreachable_server_fails_fast_naming_the_address_and_the_fix() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    feed = FeedDataset(target, batch_size=2, connect_deadline_s=0.5)
    for start in (lambda: next(iter(DataLoader(feed, batch_size=None))), feed.fetch_info):
        began = time.monotonic()
        with pytest.raises(FeedConnectionError, match="could not reach") as error:
            start()
        assert time.monotonic() - began < 5
        assert target in str(error.value) and "sigil-feed serve --config" in str(error.value)
    assert feed_threads() == []


def first(batches: Any) -> dict[str, Any]:
    """The first item of an iterable, closing its iterator (and with it the stream) right away."""
    for item in batches:
        return item
    raise AssertionError("no batch")


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_pin_memory_pins_with_cuda_and_says_so_without(server: ServerProcess,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    cuda = torch.cuda.is_available()
    with caplog.at_level(logging.WARNING, logger="sigil_feed.client.dataset"):
        batch = first(FeedDataset(server.target, batch_size=2, pin_memory=True))
    assert all(tensor.is_pinned() == cuda for tensor in batch.values())
    assert ("CUDA is not available" in caplog.text) != cuda
    batch = first(DataLoader(FeedDataset(server.target, batch_size=2), batch_size=None, pin_memory=True))
    assert all(tensor.is_pinned() == cuda for tensor in batch.values())


def test_flash_attn_kwargs_delimit_every_sequence_and_a_model_takes_them(server: ServerProcess) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    batch = first(FeedDataset(server.target, batch_size=3, flash_attn_kwargs=True))
    starts = np.flatnonzero(batch["position_ids"].reshape(-1).numpy() == 0)
    for side in ("q", "k"):
        cu_seq_lens = batch[f"cu_seq_lens_{side}"]
        assert cu_seq_lens.dtype == torch.int32
        assert cu_seq_lens.tolist() == [*starts.tolist(), 3 * SEQ_LEN]
        assert batch[f"max_length_{side}"] == int(np.diff(cu_seq_lens.numpy()).max())
    assert len(starts) > 3  # several samples per row
    model = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=SEQ_LEN, n_embd=32, n_layer=1, n_head=2,
                                       use_cache=False))
    assert math.isfinite(model(**batch).loss.item())
    with pytest.raises(ValueError, match="pack: false"):
        first(FeedDataset(server.target, "padded", batch_size=2, flash_attn_kwargs=True))


ABANDONED_ITERATOR = """
import sys
import warnings
from sigil_feed.client import FeedDataset, PackedAttentionWarning
warnings.simplefilter("ignore", PackedAttentionWarning)  # no model here to check
ds = FeedDataset(sys.argv[1], batch_size=2)
it = iter(ds)
next(it)
print(ds.state_dict()["epoch"])
"""


def test_a_script_that_leaves_its_iterator_open_exits_at_once_and_silently(server: ServerProcess) -> None:
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", ABANDONED_ITERATOR, server.target], capture_output=True,
                              text=True, timeout=60, cwd=REPO)
        assert (done.returncode, done.stderr, done.stdout.strip()) == (0, "", "0")
