"""A store on object storage read through the node-local shard cache (on a local moto_server): the first batch
from a cold shard cache against a warm local store (the bytes each sidecar fetches per epoch: locality.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from bench import startup
from bench.common import Metric, Work
from bench.s3 import aws_environment, make_bucket, moto_server
from sigil_feed.server.store.fs import resolve


def _upload(local_root: Path, location: str) -> None:
    """Copy every committed store under local_root to the location (the same fingerprints: no rebuild)."""
    target = resolve(location)
    for manifest in local_root.glob("*/manifest.json"):
        pafs.copy_files(str(manifest.parent), f"{target.root}/{manifest.parent.name}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.fs)


def measure(work: Work, local_cache: Path, write: Callable[[str, dict[str, Any]], Path]) -> list[Metric]:
    """Upload the local store to a moto_server bucket, then: the first batch on a warm local store and on the
    bucket with a cold shard cache. `write(name, keys)` writes the cached dataset's config with these dataset
    keys."""
    local = write("s3-baseline", {"cache_dir": str(local_cache)})
    with moto_server() as endpoint, aws_environment(endpoint):
        location = f"{make_bucket(endpoint)}/stores"
        _upload(local_cache, location)
        warm = startup.first_batch(local, work.path("logs", "shard-cache-warm.log"))
        cold = startup.first_batch(write("s3-cold", {"cache_dir": location,
                                                     "shard_cache_dir": str(work.path("shards-cold"))}),
                                   work.path("logs", "shard-cache-cold.log"))
    first = Metric("cold_shard_cache_first_batch_s", cold["first_batch_s"], warm["first_batch_s"], "s", "",
                   mode=cold["mode"],
                   notes=("process start to the first 16x4096 batch: the store on a local moto_server (about 85 ms "
                          "per request) with an empty shard cache, against the same store in a local folder; the "
                          "difference is opening the remote store (its manifest and samples tables) and fetching "
                          "the shards the first batch reads"), details={"cold": cold, "warm": warm})
    return [first]
