"""Cached mode for real: build once, reuse on restart, rebuild on change or damage, same data as streaming."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from sigil_feed.server.cache.store import open_store
from tests.conftest import TOKENIZER_DIR, ServerProcess, rust_pair, write_config, write_jsonl

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


@pytest.mark.parametrize(("damage", "reason"), [("truncate", "missing or truncated"), ("flip", "checksum mismatch"),
                                               ("no files", "files: Field required"),
                                               ("empty files, flip", "must list exactly tokens.bin")])
def test_damaged_store_is_detected_and_rebuilt(tmp_path: Path, start_server, damage: str, reason: str) -> None:
    corpus(tmp_path)
    config = write_config(tmp_path / "c.yaml", dataset_section(tmp_path, True), max_seq_len=512, pack=False)
    build(config)
    (store,) = stores(tmp_path)
    good = epoch_rows(start_server(config).target)
    tokens = store / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif "flip" in damage:
        data[100:108] = bytes(8)
    tokens.write_bytes(bytes(data))
    manifest = json.loads((store / "manifest.json").read_text())
    if "files" in damage:
        manifest.pop("files") if damage == "no files" else manifest.update(files={})
    (store / "manifest.json").write_text(json.dumps(manifest))
    server = start_server(config)
    assert epoch_rows(server.target) == good
    assert any("damaged, rebuilding" in line and reason in line for line in server.output)
    assert stores(tmp_path) == [store] and temporaries(tmp_path) == []


def big_config(tmp_path: Path, n: int) -> Path:
    """A corpus of n long records (a build that takes a while) served cached."""
    write_jsonl(tmp_path / "big.jsonl", [{"text": f"fn f{i}() {{ {'let x = 1; ' * 300} }}"} for i in range(n)])
    return write_config(tmp_path / "c.yaml", {"names": ["local:big.jsonl"], "use_cache": True,
                                              "cache_dir": str(tmp_path / "cache")})


def temporaries(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob(".*.tmp-*"))


def wait_for(predicate: Callable[[], object], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def cache_cli(*args: str) -> str:
    return subprocess.run([*CLI, "cache", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def start_and_kill_mid_build(tmp_path: Path, start: Callable[[Path], ServerProcess], config: Path) -> Path:
    """Start a server, SIGKILL it once its build has written tokens; returns the temporary folder it left."""
    known = set(temporaries(tmp_path))
    server = start(config)

    def started() -> list[Path]:
        return [t for t in temporaries(tmp_path) if t not in known and (t / "tokens.bin").exists()]

    wait_for(started)
    time.sleep(0.3)
    server.stop(signal.SIGKILL)
    (left,) = started()
    return left


def test_killed_builds_are_reclaimed_and_live_ones_left_alone(tmp_path: Path, start_server) -> None:
    config = big_config(tmp_path, 6000)
    cache = str(tmp_path / "cache")
    first = start_and_kill_mid_build(tmp_path, start_server, config)
    assert stores(tmp_path) == [] and temporaries(tmp_path) == [first]
    listing = cache_cli("ls", "--cache-dir", cache)
    assert "no token stores" in listing and f"{first}  stale: left by" in listing

    second = start_and_kill_mid_build(tmp_path, start_server, config)  # reclaims the first, then builds
    assert second != first and temporaries(tmp_path) == [second] and stores(tmp_path) == []

    server = start_server(config)  # reclaims the second, then builds
    wait_for(lambda: any(f"reclaimed {second}" in line for line in server.output))
    wait_for(lambda: temporaries(tmp_path))
    (live,) = temporaries(tmp_path)
    removal = cache_cli("rm", "--all", "--cache-dir", cache)
    assert live.exists() and f"left {live}: building by" in removal  # never a build that is under way
    server.stop(signal.SIGKILL)
    assert f"removed {live}" in cache_cli("rm", "--all", "--cache-dir", cache)
    assert list((tmp_path / "cache").iterdir()) == []


def test_two_builders_of_one_store_keep_one_and_neither_deletes_the_others(tmp_path: Path) -> None:
    config = big_config(tmp_path, 3000)
    builders = [subprocess.Popen([*CLI, "cache", "build", "--config", str(config)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    wait_for(lambda: stores(tmp_path) or all(b.poll() is not None for b in builders))
    (store,) = stores(tmp_path)
    inode = store.stat().st_ino
    logs = [b.communicate(timeout=300)[1] for b in builders]
    assert [b.returncode for b in builders] == [0, 0], logs
    assert all("tokenizing" in log for log in logs), "both should have built"
    assert sum("finished first by another builder: keeping it" in log for log in logs) == 1
    assert store.stat().st_ino == inode and stores(tmp_path) == [store] and temporaries(tmp_path) == []
    assert len(open_store(store, store.name)) == 3000


def test_a_build_failing_for_a_transient_reason_is_retried_then_serves(tmp_path: Path, start_server) -> None:
    """The kernel refuses to grow any file past 4 KiB (EFBIG, like a full disk) until the limit is lifted."""
    corpus(tmp_path)
    config = write_config(tmp_path / "c.yaml", dataset_section(tmp_path, True), max_seq_len=512, pack=False)
    unlimited = resource.RLIM_INFINITY
    server = start_server(config, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, unlimited)))
    with grpc.insecure_channel(server.target) as channel:
        stub = feed_pb2_grpc.DataFeedStub(channel)

        def stats() -> feed_pb2.DatasetStats:
            return stub.GetStats(feed_pb2.GetStatsRequest(), timeout=10).datasets[0]

        wait_for(lambda: stats().cache.state == "retrying")
        error = stats().cache.error
        assert "of 8 failed: OSError: [Errno 27] File too large" in error and "next attempt at" in error, error
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
        rows = epoch_rows(server.target)
        ready = stats()
    assert ready.cache.state == "ready" and ready.cache.error == "" and sum(rows.values()) == ready.cache.samples
    assert [s.read for s in ready.sources] == [301, 150]  # the retry counted from zero, once
    assert sum(s.tokens for s in ready.sources) == ready.cache.tokens
    assert any("token store build attempt 1 of 8 failed" in line for line in server.output)
    assert len(stores(tmp_path)) == 1 and temporaries(tmp_path) == []


def test_health_is_live_during_the_build_and_ready_after(tmp_path: Path, start_server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = start_server(big_config(tmp_path, 4000))
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
