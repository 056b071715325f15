"""Packed rows in every recipe the README shows: a segment's logits equal the segment's logits run alone, with a real
small Llama (and GPT-2) whose config keeps use_cache=True, on sdpa and eager attention.

In transformers 5 such a model builds a KV cache in training too and derives no per-segment mask from position_ids:
a packed row's segments attend to each other, silently. check_packed_attention (plain loops, torchrun, Accelerate)
and FeedDataModule (Lightning) make the safe thing happen; a loop that does neither is warned at its first batch.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sigil_feed.client import FeedDataset, PackedAttentionError, PackedAttentionWarning, check_packed_attention
from sigil_feed.client import attention as attention_module
from tests.conftest import ServerProcess, rust_pair, write_config, write_jsonl

SEQ_LEN = 64
EXACT = 1e-5  # packed and alone run different shapes through the same float32 kernels


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Short Rust pairs packed several to a row of 64; and the same served padded."""
    folder: Path = tmp_path_factory.mktemp("attention")
    write_jsonl(folder / "pairs.jsonl", [rust_pair(i) for i in range(200)])
    config = write_config(folder / "feed.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False},
                          max_seq_len=SEQ_LEN, server={"datasets": {"padded": {"pack": False}}})
    server = ServerProcess(config)
    yield server
    server.stop()


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if no model had been checked and nothing warned yet."""
    monkeypatch.setattr(attention_module, "_checked", threading.Event())
    monkeypatch.setattr(attention_module, "_warned", threading.Event())


def tiny_model(kind: str, attn: str, vocab_size: int) -> torch.nn.Module:
    """A randomly initialised 2-layer Llama or GPT-2 with its config's defaults (use_cache=True), in training mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=SEQ_LEN, attn_implementation=attn))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=SEQ_LEN, n_embd=32, n_layer=2,
                                           n_head=2, bos_token_id=0, eos_token_id=0, attn_implementation=attn,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    assert model.config.use_cache is True
    return model.train()


def segment_error(model: torch.nn.Module, batch: dict[str, Any], logits: torch.Tensor) -> float:
    """The largest difference between a packed batch's logits and each of its segments' logits run alone."""
    ids, positions = batch["input_ids"], batch["position_ids"].numpy()
    worst, packed_rows = 0.0, 0
    with torch.no_grad():
        for row in range(ids.shape[0]):
            starts = [*np.flatnonzero(positions[row] == 0).tolist(), ids.shape[1]]
            packed_rows += len(starts) > 2
            for start, end in itertools.pairwise(starts):
                alone = model(input_ids=ids[row:row + 1, start:end], use_cache=False).logits[0]
                worst = max(worst, float((logits[row, start:end].detach() - alone).abs().max()))
    assert packed_rows, "no row holds two segments: the test shows nothing"
    return worst


MODELS = [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")]


@pytest.mark.parametrize(("kind", "attn"), MODELS)
def test_plain_loop_checked_model_keeps_packed_segments_apart(server: ServerProcess, kind: str, attn: str) -> None:
    """The README's plain loop (and torchrun's, whose DDP forward is the module's): check_packed_attention(model)
    once, then model(**batch). Without it the segments attend to each other."""
    feed = FeedDataset(server.target, batch_size=3, seq_len=SEQ_LEN)
    model = tiny_model(kind, attn, feed.fetch_info().vocab_size)
    batches = [batch for _, batch in zip(range(2), DataLoader(feed, batch_size=None), strict=False)]
    assert segment_error(model, batches[0], model(**batches[0]).logits) > 0.05  # the defect, as measured
    assert check_packed_attention(model) <= EXACT
    assert model.config.use_cache is False and model.training
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in batches:
        output = model(**batch)
        assert segment_error(model, batch, output.logits) <= EXACT
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_accelerate_loop_checked_model_keeps_packed_segments_apart(server: ServerProcess, attn: str) -> None:
    """The README's Accelerate recipe: check_packed_attention(model) before accelerator.prepare(model, optimizer)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    feed = FeedDataset(server.target, batch_size=3, seq_len=SEQ_LEN)
    model = tiny_model("llama", attn, feed.fetch_info().vocab_size)
    check_packed_attention(model)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    for _, batch in zip(range(2), DataLoader(feed, batch_size=None), strict=False):
        output = model(**{name: tensor.to(accelerator.device) for name, tensor in batch.items()})
        assert segment_error(model, batch, output.logits) <= EXACT
        accelerator.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad()


class LeakyLM(torch.nn.Module):
    """A causal LM that takes position_ids but ignores them: plain causal attention over the whole row."""

    def __init__(self, vocab_size: int = 64) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab_size, 16), torch.nn.Linear(16, vocab_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        hidden = self.embed(input_ids)
        hidden = torch.nn.functional.scaled_dot_product_attention(hidden, hidden, hidden, is_causal=True)
        logits = self.head(hidden)
        loss = None if labels is None else torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return type("Output", (), {"logits": logits, "loss": loss})()


def lightning_fit(feed: FeedDataset, model: torch.nn.Module, **datamodule: Any) -> list[float]:
    """Lightning's fit for 2 steps on FeedDataModule(feed), the LightningModule training `model` on each batch as
    it comes; the segment error of each step's logits."""
    import lightning.pytorch as pl

    from sigil_feed.client.integrations.lightning import FeedDataModule

    errors: list[float] = []

    class CausalLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            output = self.model(**batch)
            errors.append(segment_error(self.model, batch, output.logits))
            return output.loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CausalLM(), datamodule=FeedDataModule(feed, **datamodule))
    return errors


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_lightning_datamodule_keeps_packed_segments_apart(server: ServerProcess, attn: str) -> None:
    """The README's Lightning recipe as written: FeedDataModule turns the cache off and checks the model."""
    feed = FeedDataset(server.target, batch_size=3, seq_len=SEQ_LEN)
    model = tiny_model("llama", attn, feed.fetch_info().vocab_size)
    errors = lightning_fit(feed, model)
    assert len(errors) == 2 and max(errors) <= EXACT
    assert model.config.use_cache is False


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")
def test_lightning_refuses_a_model_that_lets_packed_segments_attend_to_each_other(server: ServerProcess) -> None:
    feed = FeedDataset(server.target, batch_size=3, seq_len=SEQ_LEN)
    with pytest.raises(PackedAttentionError, match="LeakyLM does not keep packed samples apart: a packed segment's "
                                                   "outputs change with the segment before it"):
        lightning_fit(feed, LeakyLM(feed.fetch_info().vocab_size))


def test_the_check_names_a_cache_it_may_not_turn_off_and_a_model_that_leaks_anyway() -> None:
    model = tiny_model("llama", "sdpa", 64)
    with pytest.raises(PackedAttentionError, match=r"LlamaForCausalLM has config.use_cache=True"):
        check_packed_attention(model, fix=False)
    assert model.config.use_cache is True  # left as it was
    with pytest.raises(PackedAttentionError, match=r"attend to each other.*does not restart at position_ids 0"):
        check_packed_attention(LeakyLM())
    with pytest.raises(PackedAttentionError, match="could not run Sequential on a packed probe batch"):
        check_packed_attention(torch.nn.Sequential(torch.nn.Embedding(8, 4)))  # takes no input_ids=
    with pytest.raises(PackedAttentionError, match="cannot tell how many token ids Linear takes"):
        check_packed_attention(torch.nn.Linear(4, 4))


def test_the_check_leaves_modes_gradients_and_the_random_state_alone() -> None:
    model = tiny_model("llama", "eager", 64)
    model.model.layers[0].eval()  # a frozen part stays in eval mode
    modes = [m.training for m in model.modules()]
    state = torch.random.get_rng_state()
    check_packed_attention(model)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


def first_batches(feed: FeedDataset, count: int = 3) -> list[PackedAttentionWarning | Warning]:
    """The sigil-feed warnings while taking `count` batches."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in zip(range(count), feed, strict=False):
            pass
    return [w.message for w in caught if issubclass(w.category, PackedAttentionWarning)]


@pytest.mark.usefixtures("unchecked")
def test_a_packed_feed_warns_once_unless_a_model_was_checked_or_an_integration_took_it(
        server: ServerProcess) -> None:
    from sigil_feed.client.integrations.lightning import FeedDataModule

    adopted = FeedDataset(server.target, batch_size=2)
    FeedDataModule(adopted)
    assert first_batches(adopted) == []
    assert first_batches(FeedDataset(server.target, "padded", batch_size=2)) == []  # nothing packed
    (warning,) = first_batches(FeedDataset(server.target, batch_size=2))
    assert "check_packed_attention(model)" in str(warning) and "use_cache=True" in str(warning)
    assert first_batches(FeedDataset(server.target, batch_size=2)) == []  # once per process
    attention_module._warned.clear()
    check_packed_attention(tiny_model("llama", "sdpa", 64))
    assert first_batches(FeedDataset(server.target, batch_size=2)) == []
