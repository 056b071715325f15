"""The examples/ single-process training loops, run as their users run them, and the client behaviour they rely on.

One real server for the module, on a small repetitive corpus; every example trains a tiny GPT-2 on the CPU.
Lightning's and the multi-rank examples' tests are in test_examples_lightning.py and test_examples_ranks.py.
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sigil_feed.client import FeedConnectionError, FeedDataset
from tests.conftest import REPO, ServerProcess
from tests.integration.examples_support import (
    BATCH,
    SEQ_LEN,
    assert_closed,
    assert_learns,
    example,
    feed_server,
    feed_threads,
    losses,
    steps,
    stream_clients,
    tiny_causal_lm,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The module's server (examples_support.feed_server)."""
    yield from feed_server(tmp_path_factory)


def test_plain_loop_learns_and_resumes_with_exactly_the_next_batch(server: ServerProcess, tmp_path: Path) -> None:
    """A run of 30 steps saves every 12 as it goes (later batches in flight); a new process resumed from its step-12
    checkpoint trains on exactly the batches, with the losses, of the run's steps 12 to 29."""
    def plain(dump: str, *args: str) -> list[float]:
        return losses(example("plain_pytorch.py", "--target", server.target, "--steps", "30",
                              "--dump", str(tmp_path / dump), *args))[0]

    full = plain("full", "--save-steps", "12", "--save", str(tmp_path / "ckpt-{step}.pt"))
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt-12.pt", "ckpt-24.pt", "ckpt-30.pt"]
    rest = plain("resumed", "--resume", str(tmp_path / "ckpt-12.pt"))
    assert_learns(full)
    assert steps(tmp_path / "resumed") == {step: rows for step, rows in steps(tmp_path / "full").items() if step >= 12}
    assert rest == pytest.approx(full[12:], rel=1e-4)


@pytest.mark.parametrize("name", ["hf_trainer.py", "trl_sft.py"])
def test_trainer_resumed_from_a_checkpoint_gets_the_batches_of_an_uninterrupted_run(
        server: ServerProcess, tmp_path: Path, name: str) -> None:
    """FeedTrainer and FeedSFTTrainer: every checkpoint of a run holds the feed position; a new process resumed from
    the newest complete checkpoint (its step 16: a later one whose feed position is missing, as after a kill while
    saving, is passed over) trains on exactly the batches of the run's later steps."""
    def trainer(out: str, dump: str, *args: str) -> list[float]:
        return losses(example(name, "--target", server.target, "--steps", "24", "--save-steps", "8",
                              "--output-dir", str(tmp_path / out), "--dump", str(tmp_path / dump), *args))[0]

    full = trainer("full", "full-log")
    assert sorted(p.parent.name for p in (tmp_path / "full").glob("*/sigil_feed_rank0.pt")) == [
        "checkpoint-16", "checkpoint-24", "checkpoint-8"]
    shutil.copytree(tmp_path / "full" / "checkpoint-16", tmp_path / "cut" / "checkpoint-16")
    torn = tmp_path / "cut" / "checkpoint-20"
    shutil.copytree(tmp_path / "full" / "checkpoint-16", torn)
    (torn / "sigil_feed_rank0.pt").unlink()
    resumed = trainer("cut", "after", "--resume")
    assert_learns(full)
    after = steps(tmp_path / "after")
    assert sorted(after) == list(range(16, 24))
    assert after == {step: rows for step, rows in steps(tmp_path / "full-log").items() if step >= 16}
    assert resumed == pytest.approx(full, rel=1e-4)  # its log_history carries the first 16 over


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
