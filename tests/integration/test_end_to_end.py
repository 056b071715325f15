"""The whole path against a real server on a free port, read through the real client (one server for the module's
read-only tests, a dataset each where they need their own settings or counters)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sigil_feed.client import FeedDataset
from sigil_feed.client.stream import BatchStream, EpochEnd, FeedBatch
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import TOKENIZER_DIR, ServerProcess, running_servers, rust_pair, write_config, write_jsonl

N_PAIRS = 40


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module. `default`: the pairs with two malformed lines, packed into rows of 64; `padded`
    and `pad_remainder`: the clean pairs for one epoch, unpacked at 128 and packed at 64 with the default
    remainder; `counted`: the default's corpus again, read by the stats test alone so its counters are its own."""
    folder = tmp_path_factory.mktemp("end-to-end")
    records: list[Any] = [rust_pair(i) for i in range(N_PAIRS)]
    write_jsonl(folder / "clean.jsonl", records)
    records.insert(5, '{"prompt": "truncated')
    records.insert(9, {"prompt": 3, "gen": "x"})
    write_jsonl(folder / "pairs.jsonl", records)
    clean = {"names": ["local:clean.jsonl"], "epochs": 1, "remainder": "pad"}
    datasets = {"padded": {"max_seq_len": 128, "pack": False, "dataset": clean},
                "pad_remainder": {"dataset": clean}, "counted": {}}
    config = write_config(folder / "trainer.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False,
                                                    "remainder": "keep"},
                          max_seq_len=64, server={"limits": {"max_seq_len": 1024}, "datasets": datasets})
    with running_servers() as start:
        yield start(config)


def split_samples(batches: list[dict[str, torch.Tensor]], eos: int) -> list[np.ndarray]:
    """All tokens in stream order, cut after every EOS."""
    ids = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches])
    return np.split(ids, np.flatnonzero(ids == eos) + 1)


def test_padded_rows_decode_back_to_the_source_text(server: ServerProcess, tokenizer) -> None:
    records = [rust_pair(i) for i in range(N_PAIRS)]
    rows = []
    for batch in FeedDataset(server.target, "padded", batch_size=8):
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            rows.append(tokenizer.decode(ids[mask.bool()].tolist()))
    assert rows == [r["prompt"] + "\n\n" + r["gen"] + tokenizer.eos_token for r in records]


def test_packed_stream_carries_every_token_once(server: ServerProcess, tokenizer) -> None:
    ds = FeedDataset(server.target, batch_size=3)
    batches, epochs = [], set()
    for batch in ds:
        batches.append(batch)
        epochs.add(ds.epoch)
        if ds.epoch == 1:
            break
    first_epoch = batches[:-1]
    assert all(b["input_ids"].shape == (3, 64) for b in first_epoch[:-1])
    assert batches[0]["input_ids"].dtype == torch.int64 and "position_ids" in batches[0]
    parts = split_samples(first_epoch, tokenizer.eos_token_id)
    texts = [tokenizer.decode(p.tolist()) for p in parts[:N_PAIRS]]
    assert texts == [rust_pair(i)["prompt"] + "\n\n" + rust_pair(i)["gen"] + tokenizer.eos_token
                     for i in range(N_PAIRS)]
    assert all((p == tokenizer.pad_token_id).all() for p in parts[N_PAIRS:])  # only the last row's padding
    positions = first_epoch[0]["position_ids"][0]
    assert positions[0] == 0 and (positions[1:] - positions[:-1] != 1).sum() >= 1


def test_remainder_pad_completes_the_last_batch_from_the_epoch_start(server: ServerProcess, tokenizer) -> None:
    records = [rust_pair(i) for i in range(N_PAIRS)]
    batches = list(FeedDataset(server.target, "pad_remainder", batch_size=3))
    assert all(b["input_ids"].shape == (3, 64) for b in batches)
    flat = np.concatenate([b["input_ids"].reshape(-1).numpy() for b in batches])
    epoch_tokens = sum(len(tokenizer(r["prompt"] + "\n\n" + r["gen"]).input_ids) + 1 for r in records)
    assert epoch_tokens < len(flat) < epoch_tokens + 3 * 64
    assert (flat[epoch_tokens:] == flat[: len(flat) - epoch_tokens]).all()


def test_two_clients_stream_concurrently_and_errors_leave_others_alone(server: ServerProcess) -> None:
    results: dict[int, list[list[int]]] = {}

    def read(k: int) -> None:
        with BatchStream(server.target, batch_size=2, prefetch=2) as stream:
            got = []
            for item in stream:
                if isinstance(item, FeedBatch):
                    got.append(item.arrays["input_ids"].reshape(-1).tolist())
                if len(got) == 12:
                    break
            results[k] = got

    threads = [threading.Thread(target=read, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    with grpc.insecure_channel(server.target) as channel:
        stub = feed_pb2_grpc.DataFeedStub(channel)
        cases = [(feed_pb2.Open(dataset="nope", batch_size=1), grpc.StatusCode.NOT_FOUND, "nope"),
                 (feed_pb2.Open(batch_size=0), grpc.StatusCode.INVALID_ARGUMENT, "batch_size"),
                 (feed_pb2.Open(batch_size=1, seq_len=4096), grpc.StatusCode.INVALID_ARGUMENT, "seq_len"),
                 (feed_pb2.Open(batch_size=1, rank=2, world_size=2), grpc.StatusCode.INVALID_ARGUMENT, "rank"),
                 (feed_pb2.Open(batch_size=1, cursor=b"\x01garbage"), grpc.StatusCode.FAILED_PRECONDITION,
                  "cursor")]
        for request, code, word in cases:
            call = stub.Stream(iter([feed_pb2.StreamRequest(open=request)]))
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == code and word in err.value.details()
    for t in threads:
        t.join(60)
    assert len(results[0]) == 12 and results[0] == results[1]


def test_stats_account_for_every_record(server: ServerProcess) -> None:
    with BatchStream(server.target, "counted", batch_size=4) as stream:
        for item in stream:
            if isinstance(item, EpochEnd):
                break
    out = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "stats", "--target", server.target,
                          "--json"], capture_output=True, text=True, timeout=60, check=True)
    (counted,) = [d for d in json.loads(out.stdout)["datasets"] if d["name"] == "counted"]
    source = counted["sources"][0]
    assert int(source["read"]) == N_PAIRS + 2 and int(source["kept"]) == N_PAIRS
    assert source["malformed"] == {"bad_json": "1", "bad_type": "1"} and source["dropped"] == {}


def test_tiny_causal_lm_trains_on_feed_batches(server: ServerProcess) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=8192, n_positions=64, n_embd=32, n_layer=2, n_head=2, use_cache=False)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(FeedDataset(server.target, batch_size=4), batch_size=None)
    losses = []
    for step, batch in enumerate(loader):
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"],
                     position_ids=batch["position_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 15:
            break
    assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < losses[0]


def test_state_dict_resumes_with_exactly_the_next_batch(server: ServerProcess) -> None:
    full = [b["input_ids"].tolist() for _, b in zip(range(10), FeedDataset(server.target, batch_size=2), strict=False)]
    first = FeedDataset(server.target, batch_size=2)
    for _, _batch in zip(range(4), first, strict=False):
        pass
    state = first.state_dict()
    second = FeedDataset(server.target, batch_size=2)
    second.load_state_dict(state)
    rest = [b["input_ids"].tolist() for _, b in zip(range(6), second, strict=False)]
    assert rest == full[4:]


@pytest.mark.parametrize(("dataset", "top", "message"), [
    ({"names": ["local:missing.jsonl"]}, {}, "missing.jsonl"),
    ({"names": ["local:pairs.jsonl"], "min_length": 10, "max_length": 5}, {}, "max_length"),
    ({"names": ["local:pairs.jsonl"]}, {"server": {"colour": "red"}}, "server.colour"),
    ({"names": ["local:pairs.jsonl"]}, {"model_name": "/no/such/tokenizer"}, "model_name"),
])
def test_bad_config_stops_serve_with_exit_code_2(tmp_path: Path, dataset: dict, top: dict, message: str) -> None:
    write_jsonl(tmp_path / "pairs.jsonl", [rust_pair(0)])
    config = write_config(tmp_path / "bad.yaml", dataset, **top)
    result = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "serve", "--config", str(config),
                             "--port", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_embedded_default_serves_and_peek_shows_text(start_server) -> None:
    server = start_server(None)
    out = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "peek", "--target", server.target, "-n", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dataset=default" in out.stdout and "--- batch 1" in out.stdout
    assert "<|endoftext|>" in out.stdout and "fn " in out.stdout
