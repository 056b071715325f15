"""The Ray engine builds a token store from sources that live only in a bucket (moto_server on loopback): its
workers read the `s3://` files in place, and the store is the one the local engine builds from them. Ray stays
small: one local cluster on 127.0.0.1 with two logical CPUs, for this module only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sigil_feed.server.builders import ray_engine
from sigil_feed.server.config import load_config
from sigil_feed.server.feed.served import open_datasets
from sigil_feed.server.runtime import Runtime
from tests.conftest import write_config
from tests.integration.test_ray_build import only_store
from tests.integration.test_remote_sources import JSONL_GLOB, upload, write_corpus

ray = pytest.importorskip("ray")


@pytest.fixture
def small_ray(s3_bucket: str) -> Iterator[None]:
    """A local Ray cluster on loopback, two logical CPUs (an actor holds half of one, a read task one), started
    after the AWS environment points at the local S3 server, so its workers inherit it."""
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_the_ray_engine_builds_the_local_engines_store_from_s3_sources(
        tmp_path: Path, s3_bucket: str, small_ray: None, runtime: Runtime) -> None:
    write_corpus(tmp_path / "src")
    upload(tmp_path / "src" / "corpus", s3_bucket)
    names = [f"local:{s3_bucket}/{JSONL_GLOB}", f"parquet:{s3_bucket}/corpus/p"]
    datasets = {engine: {"dataset": {"names": names, "use_cache": True, "cache_dir": str(tmp_path / engine),
                                     "shard_records": 25, "min_length": 16, "tokenizer_backend": "hf"}}
                for engine in ("local", "ray")}
    config = load_config(write_config(tmp_path / "c.yaml", None, max_seq_len=128, server={"datasets": datasets}))
    opened = open_datasets(config, runtime)
    opened["local"].prepare(serve=False, show_bar=False)
    opened["ray"].prepare(serve=False, show_bar=False, build=ray_engine.build_store)
    _, local = only_store(str(tmp_path / "local"))
    _, built = only_store(str(tmp_path / "ray"))
    assert (built.engine, local.engine) == ("ray", "local")
    assert built.fingerprint == local.fingerprint and built.samples == local.samples == 240
    assert built.shards == local.shards and len(built.shards) > 5  # the same names, counts and checksums
    assert built.sources == local.sources
