"""Two sidecars serving one job from a store on object storage (a local moto_server): the bytes each fetches in an
epoch over the store's, and the shuffle quality the shard-aware order trades for that locality.

The store has a shard per part of a source file (at most `shard_records` raw records), so the corpus is split
into FILES files first; `files=1, shard_records=R` measures one big file cut into parts instead.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

from bench.common import PYTHON, REPO, Metric, Server, Work
from bench.s3 import aws_environment, make_bucket, moto_server
from bench.shuffle_quality import shuffle_quality
from sigil_feed.client.stream import BatchStream, EpochEnd
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from sigil_feed.server.cached.layout import served_sequence
from sigil_feed.server.default import DEFAULT_TOKENIZER
from sigil_feed.server.store.format import read_manifest
from sigil_feed.server.store.fs import resolve
from sigil_feed.server.store.reader import list_stores, open_store

FILES = 64  # source files, so store shards
WORLD, SIDECARS = 4, 2  # one job of four ranks, two per sidecar
VIRTUAL = 48  # a multiple of WORLD whose prefix products (2, 4, 8, 16, 48) include it
WINDOW_SHARDS = 4  # the default shuffle_window_shards


def split_jsonl(sources: list[Path], dest: Path, files: int) -> Path:
    """The sources' lines dealt in order into `files` files of about equal line counts; returns the folder."""
    lines = [line for source in sources for line in source.read_bytes().splitlines(keepends=True)]
    dest.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(lines)), files)):
        (dest / f"part-{k:03d}.jsonl").write_bytes(b"".join(lines[i] for i in part.tolist()))
    return dest


def _sidecar(config: Path, log: Path, ranks: range) -> feed_pb2.CacheState:
    """One sidecar serves one epoch of its ranks from a cold shard cache; its store stats after."""
    with Server(config, log) as server:
        for rank in ranks:
            with BatchStream(server.target, "default", batch_size=4, seq_len=4096, prefetch=4, rank=rank,
                             world_size=WORLD) as stream:
                next(item for item in stream if isinstance(item, EpochEnd))
        with grpc.insecure_channel(server.target) as channel:
            stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=60)
    return stats.datasets[0].cache


def _quality(location: str) -> dict[str, float]:
    """shuffle_quality of the store at `location` (its samples tables only), epoch 0, seed 0."""
    fs = resolve(location)
    entry = next(e for e in list_stores(fs) if e["state"] == "ready")
    store = open_store(fs, f"{fs.root}/{entry['fingerprint']}", entry["fingerprint"])
    sequence = served_sequence(store, sources=1, mode="sequential", stopping="first_exhausted", weights=[1.0],
                               task_weights=None, seed=0)
    return shuffle_quality(store, sequence, virtual=VIRTUAL, seed=0, epoch=0, window_shards=WINDOW_SHARDS)


def measure(work: Work, write: Callable[[str, list[Path], dict[str, Any]], Path], *, files: int = FILES,
            shard_records: int | None = None) -> list[Metric]:
    """Split the corpus into `files` files (cut into parts of `shard_records` raw records if given), build its
    store in a moto_server bucket, serve one epoch of ranks 0-1 and 2-3 of 4 from two sidecars (two server
    processes, each with its own cold shard cache), and measure the shuffle quality of the same store.
    `write(name, sources, keys)` writes a cached config over these sources."""
    data = split_jsonl(work.sources, work.path(f"files-{files}"), files)
    with moto_server() as endpoint, aws_environment(endpoint):
        location = f"{make_bucket(endpoint)}/stores"
        keys = {"cache_dir": location, "virtual_ranks": VIRTUAL, "shuffle_window_shards": WINDOW_SHARDS,
                **({"shard_records": shard_records} if shard_records else {})}
        build = write("locality-build", [data], keys)
        log = work.path("logs", "locality-build.log")
        with log.open("w") as out:
            subprocess.run([PYTHON, "-m", "sigil_feed.server.cli", "cache", "build", "--config", str(build)],
                           stdout=out, stderr=subprocess.STDOUT, check=True, cwd=REPO, timeout=3600)
        per = WORLD // SIDECARS
        states = [_sidecar(write(f"locality-{k}", [data], {**keys, "shard_cache_dir": str(work.path(f"shards-{k}"))}),
                           work.path("logs", f"locality-{k}.log"), range(k * per, (k + 1) * per))
                  for k in range(SIDECARS)]
        quality = _quality(location)
    store_bytes = states[0].bytes
    fetched = [s.bytes_fetched for s in states]
    sidecars = [{"bytes_fetched": s.bytes_fetched, "shard_fetches": s.shard_cache.fetches,
                 "shard_bytes_fetched": s.shard_cache.bytes_fetched, "over_store": s.bytes_fetched / store_bytes}
                for s in states]
    locality = Metric(
        "bytes_fetched_per_sidecar_over_store", max(fetched), store_bytes, "bytes", "", mode="cached",
        notes=(f"the larger of {SIDECARS} sidecars, each serving {per} of {WORLD} ranks for one epoch from a cold "
               f"shard cache; the store: {states[0].shards} shards ({files} source files), virtual_ranks {VIRTUAL}; "
               f"its share is {1 / SIDECARS:.2f}, plus the shards at its regions' boundaries, the prefetch "
               f"window and every shard's samples table (read when the store opens)"),
        details={"sidecars": sidecars, "store_bytes": store_bytes, "shards": states[0].shards})
    shuffle = Metric(
        "shuffle_same_file_distance_p10", quality["p10"], quality["global_p10"], "fraction of the epoch", "",
        mode="cached",
        notes=("distance in the epoch's delivery order between consecutive samples of the same source file, over "
               f"the epoch's length: 10th percentile with shards permuted, cut into {VIRTUAL} virtual ranks and "
               f"shuffled within windows of {WINDOW_SHARDS} shards, against a global permutation of the same data; "
               f"medians {quality['median']:.3g} against {quality['global_median']:.3g}"),
        details=quality)
    return [locality, shuffle]


NODES, LOCAL = 8, 8  # 8 sidecars x 8 ranks, numbered as torchrun does (node k: ranks 8k .. 8k + 7)
NODE_SHARDS, PER_SHARD = 256, 64  # 16,384 samples: `auto` takes 192 = 2^6 x 3 virtual ranks, 64 a prefix product
NODE_SEQ_LEN = 256


def node_shares(*, virtual: int, shards: int, samples: int, world: int = NODES * LOCAL, local: int = LOCAL,
                batch: int = 2, seq_len: int = NODE_SEQ_LEN, node_aware: bool = True) -> list[float]:
    """Each node's bytes over its share (the store's bytes / nodes): the shards its ranks' rows pin over one epoch
    (packed rows, `pad`), through the real CachedPacker on a synthetic store (lognormal lengths, `shards` shards),
    seed 0; `node_aware=False` deals by the plain rule (rank r: start + r, ...). No server: the baseline."""
    from bench.epoch_waste import heavy_tailed_lengths
    from sigil_feed.server.cached.layout import epoch_layout
    from sigil_feed.server.cached.packer import CachedPacker
    from sigil_feed.server.rows.deal import Deal
    from tests.unit.cached_store import fake_store

    store = fake_store(heavy_tailed_lengths(samples), per_shard=-(-samples // shards))
    layout = epoch_layout(store, np.arange(samples), virtual=virtual, seed=0, epoch=0, window_shards=WINDOW_SHARDS)
    size = np.bincount(store.shard, weights=store.lengths)
    nodes, shares = world // local, []
    for k in range(nodes):
        store.shards.pinned_log.clear()
        for rank in range(k * local, (k + 1) * local):
            packer = CachedPacker(store, layout, Deal(rank, world, batch, virtual if node_aware else 1),
                                  seq_len=seq_len, pack=True, completion_only=False, pad_id=0, remainder="pad")
            while packer.next_batch() is not None:
                pass
        pinned = sorted({s for p in store.shards.pinned_log for s in p})
        shares.append(float(size[pinned].sum() / (size.sum() / nodes)))
    return shares


def write_node_corpus(folder: Path, shards: int = NODE_SHARDS, per_shard: int = PER_SHARD) -> Path:
    """`shards x per_shard` distinct code records of lognormal lengths in one JSONL file (a shard per
    `per_shard` records when built with that `shard_records`); returns the folder."""
    rng = np.random.default_rng(0)
    repeats = np.clip(rng.lognormal(np.log(6), 1.0, shards * per_shard), 1, 400).astype(int)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"fn f{i}() -> u64 {{ {'let x = 1; ' * int(n)}{i} }}"}) for i, n in enumerate(repeats)]
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _node_config(path: Path, data: Path, location: str, shard_cache_dir: Path | None = None) -> Path:
    """A cached, packed config over the corpus with the bundled tokenizer, `virtual_ranks: auto`."""
    dataset = {"names": [f"local:{data}"], "use_cache": True, "cache_dir": location, "shuffle_seed": 0,
               "shard_records": PER_SHARD, "virtual_ranks": "auto", "min_length": 1, "epochs": 1,
               **({"shard_cache_dir": str(shard_cache_dir)} if shard_cache_dir else {})}
    path.write_text(yaml.safe_dump({"model_name": str(DEFAULT_TOKENIZER), "max_seq_len": NODE_SEQ_LEN,
                                    "pack": True, "dataset": dataset}))
    return path


def _rank_epoch(target: str, rank: int) -> None:
    with BatchStream(target, "default", batch_size=2, seq_len=NODE_SEQ_LEN, prefetch=4, rank=rank,
                     world_size=NODES * LOCAL) as stream:
        next(item for item in stream if isinstance(item, EpochEnd))


def _node(config: Path, log: Path, node: int) -> feed_pb2.DatasetStats:
    """One sidecar serves one epoch of its node's ranks (all at once) from a cold shard cache; its stats after."""
    with Server(config, log) as server, ThreadPoolExecutor(LOCAL) as pool:
        list(pool.map(_rank_epoch, [server.target] * LOCAL, range(node * LOCAL, (node + 1) * LOCAL)))
        with grpc.insecure_channel(server.target) as channel:
            return feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=60).datasets[0]


def measure_nodes(root: Path) -> list[Metric]:
    """bytes_fetched_per_sidecar_over_share: a 256-shard store built into a bucket on a local moto_server, then 8
    sidecars (server processes, one after another, each with its own cold shard cache) each serve one epoch of
    their node's 8 ranks of 64 (torchrun numbering) at once; the worst sidecar's token-shard bytes fetched over its
    share (the store's token bytes / 8); the notes give the plain deal's worst node on a synthetic store of the
    same shards and virtual ranks (no server)."""
    data = write_node_corpus(root / "node-corpus")
    with moto_server() as endpoint, aws_environment(endpoint):
        location = f"{make_bucket(endpoint)}/stores"
        log = root / "logs" / "nodes-build.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            subprocess.run([PYTHON, "-m", "sigil_feed.server.cli", "cache", "build", "--config",
                            str(_node_config(root / "nodes-build.yaml", data, location))],
                           stdout=out, stderr=subprocess.STDOUT, check=True, cwd=REPO, timeout=3600)
        fs = resolve(location)
        entry = next(e for e in list_stores(fs) if e["state"] == "ready")
        manifest = read_manifest(fs, f"{fs.root}/{entry['fingerprint']}", entry["fingerprint"])
        stats = [_node(_node_config(root / f"node-{k}.yaml", data, location, root / f"node-shards-{k}"),
                       root / "logs" / f"node-{k}.log", k) for k in range(NODES)]
    virtual = stats[0].info.virtual_ranks
    tokens = sum(s.tokens_file.size for s in manifest.shards)
    index = manifest.samples_index.file.size if manifest.samples_index else 0
    share = tokens / NODES
    over = [s.cache.shard_cache.bytes_fetched / share for s in stats]
    with_metadata = [s.cache.bytes_fetched / (share + index) for s in stats]
    plain = node_shares(virtual=virtual, shards=len(manifest.shards), samples=manifest.samples, node_aware=False)
    aware = node_shares(virtual=virtual, shards=len(manifest.shards), samples=manifest.samples)
    return [Metric(
        "bytes_fetched_per_sidecar_over_share", max(over), None, "x its share", "<= 1.5", mode="cached",
        notes=(f"the worst of {NODES} sidecars (server processes with cold shard caches) x {LOCAL} ranks, torchrun "
               f"numbering (node k: ranks {LOCAL}k..{LOCAL}k+{LOCAL - 1} of {NODES * LOCAL}), one epoch of packed "
               f"rows, a {len(manifest.shards)}-shard store ({manifest.samples:,} samples) on a local moto_server, "
               f"virtual_ranks auto ({virtual}): the token shards it fetched (GetStats shard_cache.bytes_fetched) "
               f"over the store's token bytes / {NODES}; with the samples index, bytes_fetched over share + index: "
               f"{max(with_metadata):.2f}; the plain deal's worst node (rank r: start + r, ...), which the server no "
               f"longer has, computed on a synthetic store of the same shards and virtual ranks (no server): "
               f"{max(plain):.2f} (node-aware there: {max(aware):.2f})"),
        details={"over_share": over, "over_share_with_index": with_metadata, "plain_synthetic": plain,
                 "node_aware_synthetic": aware, "shards": len(manifest.shards), "samples": manifest.samples,
                 "virtual_ranks": virtual, "token_bytes": tokens, "index_bytes": index,
                 "fetches": [s.cache.shard_cache.fetches for s in stats],
                 "evictions": [s.cache.shard_cache.evictions for s in stats]})]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        for metric in measure_nodes(Path(scratch)):
            print(json.dumps(metric.to_json() | {"name": metric.name}, indent=1))
