"""Cached mode for real: build once, reuse on restart, rebuild on change or damage, same data as streaming."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from sigil_feed.client import FeedDataset
from tests.conftest import TOKENIZER_DIR, rust_pair, write_config, write_jsonl

CLI = [sys.executable, "-m", "sigil_feed.server.cli"]


def corpus(tmp_path: Path, n: int = 300) -> None:
    """Pairs with two task types, code files some filters drop, and one malformed line."""
    pairs = [rust_pair(i, task="completion" if i % 3 else "doc_to_code") for i in range(n)]
    files = [{"content": f"/// Doc {i}\npub fn f{i}() -> Option<u8> {{ Some({i}) }}\n" + "// pad\n" * (i % 20),
              "path": f"crate/{'tests' if i % 5 == 0 else 'src'}/m{i}.rs"} for i in range(n // 2)]
    write_jsonl(tmp_path / "pairs.jsonl", [*pairs, "{not json"])
    write_jsonl(tmp_path / "files.jsonl", files)


def dataset_section(tmp_path: Path, use_cache: bool, **extra: object) -> dict:
    return {"names": ["local:pairs.jsonl", "local:files.jsonl"], "use_cache": use_cache,
            "cache_dir": str(tmp_path / "cache"), "shuffle_seed": 5, "interleave_mode": "weighted",
            "dataset_weights": {"local:files.jsonl": 0.5}, "task_weights": {"doc_to_code": 1.5},
            "stopping_strategy": "all_exhausted", "remainder": "keep", "epochs": 1, "min_length": 20, **extra}


def stores(tmp_path: Path) -> list[Path]:
    return sorted(p.parent for p in (tmp_path / "cache").glob("*/manifest.json"))


def build(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "cache", "build", "--config", str(config)], capture_output=True, text=True,
                          timeout=300, check=True, cwd=config.parent)


def epoch_rows(target: str, batch_size: int = 16) -> Counter[tuple[int, ...]]:
    """One epoch read with pack: false, so each row is one whole sample."""
    rows: Counter[tuple[int, ...]] = Counter()
    for batch in FeedDataset(target, batch_size=batch_size):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            rows[tuple(ids[mask.bool()].tolist())] += 1
    return rows


def test_cached_and_streaming_serve_the_same_multiset(tmp_path: Path, start_server) -> None:
    corpus(tmp_path)
    results = {}
    for use_cache in (True, False):
        config = write_config(tmp_path / f"c{use_cache}.yaml", dataset_section(tmp_path, use_cache),
                              max_seq_len=512, pack=False)
        results[use_cache] = epoch_rows(start_server(config).target)
    assert results[True] == results[False]
    assert sum(results[True].values()) > 300 and max(results[True].values()) == 2  # task-weight copies


def test_store_is_reused_on_restart_and_rebuilt_on_change(tmp_path: Path, start_server) -> None:
    corpus(tmp_path)
    config = write_config(tmp_path / "c.yaml", dataset_section(tmp_path, True), max_seq_len=128)
    assert "tokenizing" in build(config).stderr
    (store,) = stores(tmp_path)
    created = json.loads((store / "manifest.json").read_text())["created"]
    server = start_server(config)
    assert len(epoch_rows_packed(server.target)) > 0
    server.stop()
    assert json.loads((store / "manifest.json").read_text())["created"] == created
    assert not any("tokenizing" in line for line in server.output)

    write_config(tmp_path / "c.yaml", dataset_section(tmp_path, True, min_length=30), max_seq_len=128)
    build(config)
    assert len(stores(tmp_path)) == 2  # a filter change makes a new store

    tokenizer = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, tokenizer)
    spec = json.loads((tokenizer / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": 8192, "content": "<|extra|>"})
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    write_config(tmp_path / "c.yaml", dataset_section(tmp_path, True), max_seq_len=128, model_name=str(tokenizer))
    build(config)
    assert len(stores(tmp_path)) == 3  # so does a tokenizer change
    assert json.loads((store / "manifest.json").read_text())["created"] == created


def epoch_rows_packed(target: str) -> list[object]:
    return list(FeedDataset(target, batch_size=4))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_store_is_detected_and_rebuilt(tmp_path: Path, start_server, damage: str) -> None:
    corpus(tmp_path)
    config = write_config(tmp_path / "c.yaml", dataset_section(tmp_path, True), max_seq_len=512, pack=False)
    build(config)
    (store,) = stores(tmp_path)
    good = epoch_rows(start_server(config).target)
    tokens = store / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[100:108] = bytes(8)
    tokens.write_bytes(bytes(data))
    server = start_server(config)
    assert epoch_rows(server.target) == good
    assert any("damaged, rebuilding" in line for line in server.output)


def test_killed_build_leaves_no_valid_looking_store(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "big.jsonl", [{"text": f"fn f{i}() {{ {'let x = 1; ' * 300} }}"} for i in range(6000)])
    config = write_config(tmp_path / "c.yaml", {"names": ["local:big.jsonl"], "use_cache": True,
                                                "cache_dir": str(tmp_path / "cache")})
    proc = subprocess.Popen([*CLI, "cache", "build", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob(".*.tmp-*/tokens.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "cache").glob(".*.tmp-*")), "the build should have been caught mid-way"
    assert stores(tmp_path) == []
    listing = subprocess.run([*CLI, "cache", "ls", "--cache-dir", str(tmp_path / "cache")], capture_output=True,
                             text=True, check=True)
    assert "no token stores" in listing.stdout


def test_health_is_live_during_the_build_and_ready_after(tmp_path: Path, start_server) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    write_jsonl(tmp_path / "big.jsonl", [{"text": f"fn f{i}() {{ {'let x = 1; ' * 300} }}"} for i in range(4000)])
    config = write_config(tmp_path / "c.yaml", {"names": ["local:big.jsonl"], "use_cache": True,
                                                "cache_dir": str(tmp_path / "cache")})
    server = start_server(config)
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def status(service: str) -> int:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        assert status("") == serving
        assert status("sigil_feed.v1.DataFeed") != serving  # still tokenizing
        deadline = time.monotonic() + 180
        while status("sigil_feed.v1.DataFeed") != serving and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status("sigil_feed.v1.DataFeed") == serving
    assert stores(tmp_path)
