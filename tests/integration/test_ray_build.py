"""`sigil-feed cache build --engine ray`: a local Ray cluster writes the very shards and manifest the local engine
writes, into a folder and into s3:// (a real S3-compatible server on loopback), and a server serves the same
batches from either store; a rerun skips complete shards; its workers read `s3://` sources in place; nothing
else needs Ray.

The engine tests' builds run on one cluster started for the module (`--ray-address`); the bad-record test's
build starts its own, as `cache build --engine ray` does without an address."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import pytest

from sigil_feed.server.store.format import Manifest
from sigil_feed.server.store.fs import resolve
from sigil_feed.server.store.reader import verify_store
from tests.conftest import rust_pair, write_config, write_jsonl
from tests.integration.test_cache import CLI, batch_digests, corpus, dataset_section
from tests.integration.test_remote_sources import JSONL_GLOB, upload, write_corpus

SHARD_RECORDS = 100


def three_sources(tmp_path: Path) -> list[str]:
    """test_cache's two sources plus one of three files: cut in parts of SHARD_RECORDS raw records, pairs.jsonl
    (301 lines, the last one malformed: an empty last part) is four shards, files.jsonl (150) two, the three
    small files one each: nine shards in all. The last small file holds two-turn conversations (`messages`)."""
    corpus(tmp_path)
    for f in range(3):
        write_jsonl(tmp_path / "more" / f"part{f}.jsonl",
                    [(conversation if f == 2 else dict)(rust_pair(i, task="review")) for i in range(f, 90, 3)])
    return ["local:pairs.jsonl", "local:files.jsonl", "local:more/*.jsonl"]


def cache_build(config: Path, *engine: str) -> str:
    """Run `sigil-feed cache build` and return its log (stderr)."""
    done = subprocess.run([*CLI, "cache", "build", "--config", str(config), *engine], capture_output=True,
                          text=True, timeout=280, cwd=config.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def only_store(location: str) -> tuple[str, Manifest]:
    """The one committed store under a location: its path and manifest (every shard's checksum verified)."""
    fs = resolve(location)
    (entry,) = [e for e in fs.listdir(fs.root) if fs.exists(f"{e.path}/manifest.json")]
    return entry.path, verify_store(fs, entry.path, entry.base_name)


def conversation(pair: dict[str, str]) -> dict[str, object]:
    """A pair as the first of two user-assistant exchanges."""
    return {"messages": [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair["gen"]},
                         {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "It cannot overflow."}],
            "_task_type": pair["_task_type"]}


RAY_HEAD = """
import sys
import ray
ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
         configure_logging=False, log_to_driver=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test module is done with it
ray.shutdown()
"""


class RayHead:
    """A local Ray cluster of 2 CPUs, held by a driver process that shuts it down when its stdin closes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RAY_HEAD], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    @cached_property
    def address(self) -> str:
        """The cluster's address, for `--ray-address` (waits for the cluster to be up)."""
        assert self.proc.stdout is not None
        address = self.proc.stdout.readline().strip()
        assert address, f"the Ray cluster did not start (exit code {self.proc.wait()})"
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # its processes share the pipe
        return address

    def close(self) -> None:
        """Shut the cluster down (killed if it takes longer than a minute)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def ray_head(s3_endpoint: str) -> Iterator[RayHead]:
    """The module's Ray cluster; it starts while the test does its first, local, build. Its workers reach the
    local S3 server through the standard AWS environment, as a real cluster's would reach its object storage; Ray's
    token authentication uses a token of the module's own, which the builds the module starts inherit."""
    pytest.importorskip("ray.data")
    from bench.s3 import S3_ENV

    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, **S3_ENV, "RAY_AUTH_MODE": "token",
                           "RAY_AUTH_TOKEN": secrets.token_hex(32)}.items():
            env.setenv(key, value)
        head = RayHead()
        try:
            yield head
        finally:
            head.close()


WHERE = ("local", "s3")  # a folder, and s3:// on the local S3-compatible server


def test_ray_and_local_engines_build_the_same_store_and_serve_the_same_batches(
        tmp_path: Path, start_server, ray_head: RayHead, request: pytest.FixtureRequest) -> None:
    """Each engine builds the corpus's store into a folder and into s3:// (one dataset per location in one config,
    so one `cache build` builds both); then each location is checked on its own."""
    roots = {"local": str(tmp_path), "s3": request.getfixturevalue("s3_bucket")}
    names = three_sources(tmp_path)
    configs, manifests, digests = {}, {}, {}
    for engine in ("local", "ray"):
        datasets = {where: {"dataset": dataset_section(
            tmp_path, True, names=names, cache_dir=f"{root}/{engine}", completion_only=True, chat_template=True,
            shard_records=SHARD_RECORDS)} for where, root in roots.items()}
        configs[engine] = write_config(tmp_path / f"{engine}.yaml", None, max_seq_len=128,
                                       server={"datasets": datasets})
        on_cluster = () if engine == "local" else ("--ray-address", ray_head.address)  # up by now
        log = cache_build(configs[engine], "--engine", engine, *on_cluster)
        assert log.count("9 shards") == log.count("9 written, 0 complete from before") == len(WHERE), log[-2000:]
        for where, root in roots.items():
            _, manifests[engine, where] = only_store(f"{root}/{engine}")
    for where in WHERE:
        local, ray = manifests["local", where], manifests["ray", where]
        assert (ray.engine, local.engine) == ("ray", "local")
        assert ray.fingerprint == local.fingerprint and ray.samples == local.samples > 300
        assert ray.shards == local.shards  # same names, counts, accounting and file checksums: the same bytes
        assert [s.samples == 0 for s in local.shards] == [False] * 3 + [True] + [False] * 5  # pairs' empty last part
        assert ray.sources == local.sources and ray.tokenizer_backend == local.tokenizer_backend
        # per conversation: its second user turn, and the template's newline after its last answer
        assert ray.format == local.format == 3 and local.shards[-1].masked_spans == 2 * 30

    for engine in ("local", "ray"):
        server = start_server(configs[engine])
        for where in WHERE:
            digests[engine, where] = batch_digests(server.target, world_size=2, dataset=where)
        assert not any("tokenizing" in line for line in server.output)  # served the built stores
    for where in WHERE:
        assert digests["ray", where] == digests["local", where] and len(digests["ray", where]) > 10

    for where, root in roots.items():  # a rerun after a lost manifest and a lost shard writes that shard alone
        store, _ = only_store(f"{root}/ray")
        fs = resolve(f"{root}/ray")
        fs.delete(f"{store}/manifest.json")
        fs.delete(f"{store}/shards/{manifests['ray', where].shards[1].name}.tokens.bin")  # the middle part of a file
    log = cache_build(configs["ray"], "--engine", "ray", "--ray-address", ray_head.address)
    assert log.count("9 shards on Ray: 1 written, 8 complete from before") == len(WHERE), log[-2000:]
    for where, root in roots.items():
        assert only_store(f"{root}/ray")[1].shards == manifests["local", where].shards


def test_the_ray_engine_builds_the_local_engines_store_from_s3_sources(
        tmp_path: Path, s3_bucket: str, ray_head: RayHead) -> None:
    """Sources that live only in the bucket: the cluster's workers read the `s3://` files in place, and the store
    is the one the local engine builds from them."""
    write_corpus(tmp_path / "src")
    upload(tmp_path / "src" / "corpus", s3_bucket)
    names = [f"local:{s3_bucket}/{JSONL_GLOB}", f"parquet:{s3_bucket}/corpus/p"]
    for engine, *on_cluster in (("local",), ("ray", "--ray-address", ray_head.address)):
        dataset = {"names": names, "use_cache": True, "cache_dir": str(tmp_path / engine), "shard_records": 25,
                   "min_length": 16, "tokenizer_backend": "hf"}
        cache_build(write_config(tmp_path / f"{engine}.yaml", dataset, max_seq_len=128), "--engine", engine,
                    *on_cluster)
    _, local = only_store(str(tmp_path / "local"))
    _, built = only_store(str(tmp_path / "ray"))
    assert (built.engine, local.engine) == ("ray", "local")
    assert built.fingerprint == local.fingerprint and built.samples == local.samples == 240
    assert built.shards == local.shards and len(built.shards) > 5  # the same names, counts and checksums
    assert built.sources == local.sources


def test_a_bad_record_stops_a_ray_build_with_its_location(tmp_path: Path) -> None:
    """on_bad_record: fail inside a Ray task: the CLI's bad-input exit code and the record's file and line, out
    of Ray's wrappers; no store committed. (No --ray-address: the build starts, and stops, a cluster of its own.)"""
    pytest.importorskip("ray.data")
    corpus(tmp_path)
    config = write_config(tmp_path / "c.yaml", dataset_section(tmp_path, True, on_bad_record="fail"))
    done = subprocess.run([*CLI, "cache", "build", "--config", str(config), "--engine", "ray"], capture_output=True,
                          text=True, timeout=280, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"sigil-feed: error: {tmp_path / 'pairs.jsonl'}:301: bad record (bad_json)" in done.stderr
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


def test_nothing_but_the_ray_engine_needs_ray(tmp_path: Path) -> None:
    """With Ray unimportable the server, the client and the local engine work, and `--engine ray` says what to
    install."""
    corpus(tmp_path)
    config = write_config(tmp_path / "c.yaml", dataset_section(tmp_path, True))
    script = ("import sys; sys.modules['ray'] = None\n"
              "import sigil_feed.server.rpc.app, sigil_feed.client\n"
              "from sigil_feed.server.cli import main\n"
              f"code = main(['cache', 'build', '--config', {str(config)!r}])\n"
              "assert code == 0 and 'ray' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
              f"sys.exit(main(['cache', 'build', '--config', {str(config)!r}, '--engine', 'ray']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the ray engine needs Ray: pip install 'sigil-feed[ray]'" in done.stderr
    assert json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())["engine"] == "local"
