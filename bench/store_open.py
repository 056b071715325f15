"""Opening a store of many shards on object storage (a local moto_server): `open_store` against the sequential
baseline (every shard's files looked up, then every samples table read, one request after another), same run.

`python -m bench.store_open [--shards 512] [--samples 256]` runs it alone (no corpus needed); `python -m bench`
runs it with the rest. The store is synthetic (random lengths and ids): opening reads only its manifest and
samples tables, so what the samples hold does not matter, only how many there are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from bench.common import REPO, Metric
from bench.s3 import aws_environment, make_bucket, moto_server
from sigil_feed.server.store.format import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    ShardRows,
    SourceSnapshot,
    TokenFacts,
    read_manifest,
    read_samples,
    shard_name,
    shard_problem,
    store_dir,
    write_manifest,
    write_shard,
)
from sigil_feed.server.store.fs import StoreFS, resolve
from sigil_feed.server.store.reader import READERS, open_store

SHARDS = 512
SAMPLES = 256  # per shard
FINGERPRINT = "5707e0be11c0ffee"
ROUNDS = 2  # alternating baseline and open_store, the best of each kept


def make_store(fs: StoreFS, shards: int, samples: int, *, seed: int = 0) -> str:
    """A committed synthetic store of `shards` shards of `samples` samples (lengths 16-512), written in parallel;
    returns its folder."""
    path = store_dir(fs, FINGERPRINT)
    rng = np.random.default_rng(seed)
    lengths = [rng.integers(16, 512, samples) for _ in range(shards)]

    def write(k: int) -> Any:
        ids = np.random.default_rng(k).integers(0, 60000, int(lengths[k].sum()), dtype=np.uint16)
        rows = ShardRows(ids=ids, lengths=lengths[k], prompt_tokens=np.zeros(samples, dtype=np.int32),
                         file=np.full(samples, k, dtype=np.int32), row=np.arange(samples, dtype=np.int64),
                         task_type=[None] * samples)
        return write_shard(fs, path, shard_name(FINGERPRINT, 0, f"f{k}"), [rows], source=0, dtype="<u2")

    with ThreadPoolExecutor(16) as pool:
        facts = list(pool.map(write, range(shards)))
    accounting = SourceSnapshot(spec="synthetic", read=shards * samples, kept=shards * samples, dropped={},
                                malformed={}, tokens=sum(f.tokens for f in facts), lengths=[0] * 18)
    write_manifest(fs, path, Manifest(
        format=FORMAT_VERSION, fingerprint=FINGERPRINT, dtype="<u2", samples=sum(f.samples for f in facts),
        tokens=sum(f.tokens for f in facts), created=time.time(), dataset="bench", shards=facts,
        sources=[accounting], tokenizer_fingerprint="synthetic",
        token_facts=TokenFacts(vocab_size=60000, eos_id=0, pad_id=0)))
    return path


def sequential_open(fs: StoreFS, path: str) -> int:
    """The baseline, as a sidecar opened a remote store before: the manifest, each shard's two files looked up,
    then each samples table read and checked, one request after another; returns the samples."""
    manifest = read_manifest(fs, path, FINGERPRINT)
    for facts in manifest.shards:
        assert shard_problem(fs, path, facts, verify=False) is None
    return sum(read_samples(fs, path, facts).num_rows for facts in manifest.shards)


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _set_index(fs: StoreFS, path: str, manifest: Manifest, index: bool) -> None:
    """Commit the manifest with its samples index, or without it (as stores committed before the index were)."""
    chosen = manifest if index else manifest.model_copy(update={"samples_index": None})
    fs.write_bytes(f"{path}/{MANIFEST}", chosen.model_dump_json(indent=1).encode())


CHILD = """
import sys, time
from bench.store_open import FINGERPRINT, sequential_open
from sigil_feed.server.store.fs import resolve
from sigil_feed.server.store.reader import open_store
location, path, how = sys.argv[1:4]
fs = resolve(location)  # the S3 client made (the AWS SDK started) before the clock starts
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
if how == "sequential":
    sequential_open(fs, path)
else:
    open_store(fs, path, FINGERPRINT)
print(time.perf_counter() - t0, flush=True)
"""


def together(location: str, path: str, how: str, sidecars: int) -> float:
    """`sidecars` processes open the store at the same moment (`how`: open_store or the sequential baseline);
    the slowest one's seconds (imports excluded)."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, location, path, how], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO) for _ in range(sidecars)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return max(float(proc.communicate(timeout=600)[0].strip()) for proc in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def measure(shards: int = SHARDS, samples: int = SAMPLES, rounds: int = ROUNDS, sidecars: int = 0) -> list[Metric]:
    """Write a synthetic store of `shards` shards into a bucket on a local moto_server, then time opening it as a
    sidecar does (open_store, a fresh filesystem each time): with its samples index, and without (a store committed
    before the index: every samples table read, in parallel), against the sequential baseline, alternating."""
    with moto_server() as endpoint, aws_environment(endpoint):
        location = f"{make_bucket(endpoint)}/stores"
        fs = resolve(location)
        t_make, path = _timed(lambda: make_store(fs, shards, samples))
        manifest = read_manifest(fs, path, FINGERPRINT)
        assert manifest.samples_index is not None
        runs: dict[str, list[float]] = {"sequential_s": [], "store_open_s": [], "without_index_s": []}
        for _ in range(rounds):
            seconds, count = _timed(lambda: sequential_open(resolve(location), path))
            assert count == shards * samples
            runs["sequential_s"].append(seconds)
            for name, index in (("store_open_s", True), ("without_index_s", False)):
                _set_index(fs, path, manifest, index)
                seconds, store = _timed(lambda: open_store(resolve(location), path, FINGERPRINT))
                assert len(store) == shards * samples and (store.samples_bytes_read == manifest.samples_index.file.size
                                                           ) == index
                runs[name].append(seconds)
        _set_index(fs, path, manifest, True)
        if sidecars:
            runs[f"{sidecars}_sidecars_s"] = [together(location, path, "open_store", sidecars)]
            runs[f"{sidecars}_sidecars_sequential_s"] = [together(location, path, "sequential", sidecars)]
    best = {name: min(values) for name, values in runs.items()}
    return [Metric("store_open_s", best["store_open_s"], best["sequential_s"], "s", "", mode="cached",
                   notes=(f"open_store of a synthetic store of {shards} shards x {samples} samples in a bucket on a "
                          "local moto_server (bench/store_open.py): the manifest, one listing of the shards, the "
                          "samples index (one file), checked; the baseline looks up each shard's two files and reads "
                          "each samples table one request after another, as sidecars did; `without_index_s` in "
                          f"details opens the same store without its index (every samples table, {READERS} at a "
                          f"time), as a store committed before the index opens; best of {rounds} alternating "
                          f"rounds; with sidecars, `{sidecars}_sidecars_s` in details: that many processes open it "
                          "at the same moment (the slowest, imports and S3 client start excluded), against the same "
                          "for the baseline; "
                          "target: under 3 s"),
                   details={"runs": runs, "best": best, "shards": shards, "samples_per_shard": samples,
                            "index_bytes": manifest.samples_index.file.size, "write_store_s": t_make,
                            "met_under_3_s": best["store_open_s"] < 3})]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_open", description=__doc__)
    parser.add_argument("--shards", type=int, default=SHARDS)
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples per shard")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--sidecars", type=int, default=0, help="also open it from this many processes at once")
    args = parser.parse_args()
    for metric in measure(args.shards, args.samples, args.rounds, args.sidecars):
        print(json.dumps(metric.to_json() | {"name": metric.name}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
