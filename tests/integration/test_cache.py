"""Cached mode for real: build once, reuse on restart (and on a change of serve-time settings), rebuild on a
change of content or on damage, resume a killed build, serve from object storage, same data as streaming."""

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
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from sigil_feed.server.store.fs import resolve
from sigil_feed.server.store.reader import TokenStore, open_store
from tests.conftest import TOKENIZER_DIR, batch_digest, running_servers, rust_pair, write_config, write_jsonl

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


def open_local(store: Path) -> TokenStore:
    return open_store(resolve(store.parent), str(store), store.name)


def build(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "cache", "build", "--config", str(config)], capture_output=True, text=True,
                          timeout=300, check=True, cwd=config.parent)


def epoch_rows(target: str, batch_size: int = 16, dataset: str = "default") -> Counter[tuple[int, ...]]:
    """One epoch read with pack: false, so each row is one whole sample."""
    rows: Counter[tuple[int, ...]] = Counter()
    for batch in FeedDataset(target, dataset, batch_size=batch_size):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            rows[tuple(ids[mask.bool()].tolist())] += 1
    return rows


SERVE_TIME = [{}, {"dataset_weights": {"local:files.jsonl": 3.0}, "task_weights": {"doc_to_code": 2.5},
                  "shuffle_seed": 9, "stopping_strategy": "first_exhausted"},
              {"interleave_mode": "round_robin", "task_weights": None, "stopping_strategy": "first_exhausted"}]


def test_cached_and_streaming_serve_the_same_multiset_and_serve_time_settings_reuse_the_store(
        tmp_path: Path, start_server) -> None:
    """Mixing weights, task weights, stopping and the seed are serve-time decisions: a change of them serves
    another multiset from the same store (not rebuilt: a server restarted with each), the same one streaming mode
    serves (one server, a streaming dataset per setting)."""
    corpus(tmp_path)
    streaming = write_config(tmp_path / "streaming.yaml", None, max_seq_len=512, pack=False, server={"datasets": {
        f"s{i}": {"dataset": dataset_section(tmp_path, False, **settings)} for i, settings in enumerate(SERVE_TIME)}})
    streamed = start_server(streaming)
    multisets, created = [], set()
    for i, settings in enumerate(SERVE_TIME):
        config = write_config(tmp_path / f"c{i}.yaml", dataset_section(tmp_path, True, **settings), max_seq_len=512,
                              pack=False)
        server = start_server(config)
        rows = epoch_rows(server.target)
        assert i == 0 or not any("tokenizing" in line for line in server.output)
        assert rows == epoch_rows(streamed.target, dataset=f"s{i}"), settings
        (store,) = stores(tmp_path)
        created.add(json.loads((store / "manifest.json").read_text())["created"])
        multisets.append(rows)
    assert len(created) == 1  # built once
    assert sum(multisets[0].values()) > 300 and max(multisets[0].values()) == 2  # task-weight copies
    assert max(multisets[1].values()) == 3 and max(multisets[2].values()) == 1
    assert len({frozenset(m.items()) for m in multisets}) == 3


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


@dataclass(frozen=True)
class Built:
    """The corpus in a folder of its own, its store built by `cache build` (pack: false at 512), and that store's
    epoch as a server reads it."""

    folder: Path
    store: Path
    rows: Counter[tuple[int, ...]]

    def copy(self, tmp_path: Path, name: str) -> tuple[Path, Path]:
        """A config of this corpus with its own cache_dir in tmp_path holding a copy of the store, and the copy."""
        copy = tmp_path / "cache" / self.store.name
        shutil.copytree(self.store, copy)
        config = write_config(self.folder / f"{name}.yaml", dataset_section(tmp_path, True), max_seq_len=512,
                              pack=False)
        return config, copy


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """Built once for the tests that damage or replace a store: each works on a copy in its own cache_dir (the
    content fingerprint names the corpus's files and settings, not where the store lives)."""
    folder = tmp_path_factory.mktemp("built")
    corpus(folder)
    config = write_config(folder / "c.yaml", dataset_section(folder, True), max_seq_len=512, pack=False)
    build(config)
    (store,) = stores(folder)
    with running_servers() as start:
        return Built(folder, store, epoch_rows(start(config).target))


@pytest.mark.parametrize(("damage", "reason"), [("truncate", "missing or truncated"), ("flip", "checksum mismatch"),
                                               ("no shards", "shards: Field required"),
                                               ("empty shards, flip", "the shards' samples do not sum")])
def test_damaged_store_is_detected_and_rebuilt(tmp_path: Path, start_server, built: Built, damage: str,
                                               reason: str) -> None:
    config, store = built.copy(tmp_path, damage.replace(" ", "-").replace(",", ""))
    (tokens, _) = sorted((store / "shards").glob("*.tokens.bin"))
    data = bytearray(tokens.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif "flip" in damage:
        data[100:108] = bytes(8)
    tokens.write_bytes(bytes(data))
    manifest = json.loads((store / "manifest.json").read_text())
    if "shards" in damage:
        manifest.pop("shards") if damage == "no shards" else manifest.update(shards=[])
    (store / "manifest.json").write_text(json.dumps(manifest))
    server = start_server(config)
    assert epoch_rows(server.target) == built.rows
    assert any("damaged, rebuilding" in line and reason in line for line in server.output)
    written = "0 written" if damage == "no shards" else "1 written"  # only the damaged shard is tokenized again
    assert any(f"2 shards: {written}" in line for line in server.output), server.output
    assert stores(tmp_path) == [store] and temporaries(tmp_path) == []


def test_a_format_1_store_is_rebuilt_as_format_2_with_a_log_line(tmp_path: Path, start_server, built: Built) -> None:
    config, store = built.copy(tmp_path, "format-1")
    assert stores(tmp_path) == [store]
    shutil.rmtree(store)
    store.mkdir()
    (store / "tokens.bin").write_bytes(bytes(64))  # what format 1 kept beside its manifest
    (store / "manifest.json").write_text(json.dumps({"format": 1, "fingerprint": store.name, "files": {}}))
    server = start_server(config)
    assert epoch_rows(server.target) == built.rows
    assert any(f"token store format 1 at {store}: rebuilding" in line for line in server.output)
    assert json.loads((store / "manifest.json").read_text())["format"] == 2 and not (store / "tokens.bin").exists()


def big_config(tmp_path: Path, n: int, files: int = 1) -> Path:
    """A corpus of n long records in `files` files (a build that takes a while) served cached."""
    for f in range(files):  # one shard per file
        write_jsonl(tmp_path / "big" / f"part{f}.jsonl", [{"text": f"fn f{i}() {{ {'let x = 1; ' * 300} }}"}
                                                          for i in range(f, n, files)])
    return write_config(tmp_path / "c.yaml", {"names": ["local:big"], "use_cache": True,
                                              "cache_dir": str(tmp_path / "cache")})


def temporaries(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("**/.*.tmp-*"))


def shard_facts(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*/shards/*.json"))


def wait_for(predicate: Callable[[], object], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def cache_cli(*args: str) -> str:
    return subprocess.run([*CLI, "cache", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def test_a_killed_build_is_finished_by_the_next_start_which_skips_complete_shards(tmp_path: Path,
                                                                                 start_server) -> None:
    config = big_config(tmp_path, 6000, files=6)
    server = start_server(config)
    wait_for(lambda: len(shard_facts(tmp_path)) >= 2)
    server.stop(signal.SIGKILL)
    done = len(shard_facts(tmp_path))
    assert stores(tmp_path) == [] and 2 <= done < 6  # no manifest: not a store, whatever shards are there
    listing = cache_cli("ls", "--cache-dir", str(tmp_path / "cache"))
    assert "no token stores" in listing and "partial" in listing

    server = start_server(config)
    wait_for(lambda: any("token store ready" in line for line in server.output))
    assert any(f"6 shards: {6 - done} written, {done} complete from before" in line for line in server.output)
    (store,) = stores(tmp_path)
    assert len(open_local(store)) == 6000 and len(shard_facts(tmp_path)) == 6
    assert temporaries(tmp_path) == []  # the killed builder's half-written shard file is reclaimed
    assert f"removed {store}" in cache_cli("rm", "--all", "--cache-dir", str(tmp_path / "cache"))
    assert not any(p.name == store.name for p in (tmp_path / "cache").iterdir())


def test_two_builders_of_one_store_elect_one_and_neither_deletes_anything(tmp_path: Path) -> None:
    """Two `cache build`s of one store at once: the build lease elects one, which tokenizes; the other waits for
    its manifest. The store folder is never removed or replaced."""
    config = big_config(tmp_path, 3000, files=3)
    builders = [subprocess.Popen([*CLI, "cache", "build", "--config", str(config)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    wait_for(lambda: list((tmp_path / "cache").glob("*")) or all(b.poll() is not None for b in builders))
    (folder,) = (tmp_path / "cache").glob("*")
    inode = folder.stat().st_ino
    logs = [b.communicate(timeout=300)[1] for b in builders]
    assert [b.returncode for b in builders] == [0, 0], logs
    assert stores(tmp_path) == [folder] and folder.stat().st_ino == inode and temporaries(tmp_path) == []
    assert len(open_local(folder)) == 3000
    assert sum("tokenizing" in log for log in logs) == 1, logs


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
        assert "of 8 failed: OSError: [Errno 27]" in error and "File too large" in error, error
        assert "next attempt at" in error, error
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
        rows = epoch_rows(server.target)
        ready = stats()
    assert ready.cache.state == "ready" and ready.cache.error == "" and sum(rows.values()) > 300
    assert ready.cache.samples == sum(s.kept for s in ready.sources)
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


def batch_digests(target: str, world_size: int, dataset: str = "default") -> list[str]:
    """Every batch of one epoch of every rank, as hashes of its tensors (packed rows)."""
    return [batch_digest(batch) for rank in range(world_size)
            for batch in FeedDataset(target, dataset, batch_size=4, rank=rank, world_size=world_size)]


def test_a_store_on_object_storage_serves_what_a_local_store_serves(tmp_path: Path, start_server,
                                                                    s3_bucket: str) -> None:
    """A store built into s3:// (a real S3-compatible server on loopback) and served from there: every batch of
    both ranks identical to a local store's, every sample exactly once, and a restart builds nothing."""
    corpus(tmp_path)
    batches = {}
    for where, location in (("local", str(tmp_path / "cache")), ("s3", f"{s3_bucket}/stores")):
        config = write_config(tmp_path / f"{where}.yaml", dataset_section(tmp_path, True, cache_dir=location,
                                                                           remainder="keep"), max_seq_len=128)
        if where == "s3":
            build(config)
        server = start_server(config)
        batches[where] = batch_digests(server.target, world_size=2)
        assert where == "local" or not any("tokenizing" in line for line in server.output)
    assert batches["s3"] == batches["local"] and len(batches["local"]) > 10
    assert "samples=" in cache_cli("ls", "--cache-dir", f"{s3_bucket}/stores")
    with grpc.insecure_channel(server.target) as channel:  # the server over the s3:// store
        stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=60).datasets[0]
    assert stats.cache.path.startswith(f"{s3_bucket}/stores/")
