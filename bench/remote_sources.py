"""Sources read in place from object storage (a local moto_server) against the same files on local disk, same run.

`python -m bench.remote_sources [--mb 64] [--rounds 3]` runs it alone (no corpus needed: synthetic code records,
the bundled tokenizer); `python -m bench` runs it with the rest. Two metrics:
- `remote_first_batch_vs_local`: process start of `sigil-feed serve` (one streaming dataset) to the first batch in a
  client, the source in a bucket against the same files on disk (target within 2x);
- `remote_read_vs_local`: MB/s of reading every record of the sources with the server's readers (JSONL plain and
  zstd, Parquet), from the bucket against from disk (reported).
The two sides alternate, the best of each kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml
import zstandard

from bench.common import REPO, Metric, Server
from bench.s3 import aws_environment, make_bucket, moto_server
from sigil_feed.client.stream import BatchStream, FeedBatch
from sigil_feed.server.pipeline.sources.opening import open_source
from sigil_feed.server.store.fs import resolve

MB = 64  # of JSONL in all, over the three formats
ROUNDS = 3
TOKENIZER = REPO / "server" / "default" / "tokenizer"
FILES = 4  # per format


def _record(i: int) -> bytes:
    noise = hashlib.sha256(str(i).encode()).hexdigest() * 4
    return json.dumps({"text": f"pub fn f{i}(x: u32) -> u32 {{ x + {i} }} // {noise}", "path": f"src/m{i}.rs"}
                      ).encode() + b"\n"


def write_sources(root: Path, megabytes: int) -> dict[str, int]:
    """FILES plain JSONL, FILES zstd JSONL and FILES Parquet files under root/corpus, about megabytes/3 each;
    returns each format's bytes on disk."""
    per_file = megabytes * 1_000_000 // (3 * FILES)
    sizes = {"jsonl": 0, "zst": 0, "parquet": 0}
    i = 0
    for f in range(FILES):
        lines = []
        while sum(map(len, lines)) < per_file:
            lines.append(_record(i))
            i += 1
        data = b"".join(lines)
        (root / "corpus/jsonl").mkdir(parents=True, exist_ok=True)
        (root / "corpus/zst").mkdir(parents=True, exist_ok=True)
        (root / "corpus/parquet").mkdir(parents=True, exist_ok=True)
        (root / f"corpus/jsonl/part{f}.jsonl").write_bytes(data)
        (root / f"corpus/zst/part{f}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        pq.write_table(pa.Table.from_pylist([json.loads(line) for line in lines]),
                       root / f"corpus/parquet/part{f}.parquet", row_group_size=4096)
    for kind in sizes:
        sizes[kind] = sum(p.stat().st_size for p in (root / "corpus" / kind).iterdir())
    return sizes


SPECS = {"jsonl": "local:{}/corpus/jsonl", "zst": "local:{}/corpus/zst/*.jsonl.zst",
         "parquet": "parquet:{}/corpus/parquet"}


def read_all(spec: str) -> tuple[float, int]:
    """Seconds to read every record of a source (a fresh one), and how many."""
    t0 = time.perf_counter()
    count = sum(1 for _ in open_source(spec, 0, base_dir=REPO))
    return time.perf_counter() - t0, count


def first_batch(config: Path, log: Path) -> float:
    """Seconds from starting a server to the first 8x1024 batch in this process."""
    with Server(config, log) as server:
        with BatchStream(server.target, "default", batch_size=8, seq_len=1024, prefetch=2) as stream:
            next(item for item in stream if isinstance(item, FeedBatch))
        return time.monotonic() - server.started


def streaming_config(path: Path, names: list[str]) -> Path:
    body = {"model_name": str(TOKENIZER), "max_seq_len": 1024, "pack": True,
            "dataset": {"names": names, "use_cache": False, "shuffle_seed": 0, "tokenizer_backend": "hf"}}
    path.write_text(yaml.safe_dump(body))
    return path


def measure(megabytes: int = MB, rounds: int = ROUNDS) -> list[Metric]:
    """Write the sources on disk and into a bucket of a local moto_server; time the first streaming batch and the
    read of every record from either place, alternating."""
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as scratch, moto_server() as endpoint, \
            aws_environment(endpoint):
        root = Path(scratch)
        sizes = write_sources(root, megabytes)
        bucket = make_bucket(endpoint)
        pafs.copy_files(str(root / "corpus"), f"{bucket.removeprefix('s3://')}/corpus",
                        destination_filesystem=resolve(bucket).fs)
        places = {"local": str(root), "s3": bucket}
        reads: dict[str, dict[str, list[float]]] = {kind: {"local": [], "s3": []} for kind in SPECS}
        starts: dict[str, list[float]] = {"local": [], "s3": []}
        counts: dict[tuple[str, str], int] = {}
        for r in range(rounds):
            for where, prefix in places.items():
                for kind, spec in SPECS.items():
                    seconds, counts[kind, where] = read_all(spec.format(prefix))
                    reads[kind][where].append(seconds)
                    assert counts[kind, where] == counts[kind, "local"], (kind, counts)  # the same records
                names = [SPECS["jsonl"].format(prefix), SPECS["parquet"].format(prefix)]
                config = streaming_config(root / f"{where}.yaml", names)
                starts[where].append(first_batch(config, root / f"{where}-{r}.log"))
    best_reads = {kind: {where: min(v) for where, v in sides.items()} for kind, sides in reads.items()}
    mb_s = {kind: {where: sizes[kind] / 1e6 / s for where, s in sides.items()} for kind, sides in best_reads.items()}
    total = sum(sizes.values()) / 1e6
    s3_rate = total / sum(best_reads[k]["s3"] for k in SPECS)
    local_rate = total / sum(best_reads[k]["local"] for k in SPECS)
    best_start = {where: min(v) for where, v in starts.items()}
    return [
        Metric("remote_first_batch_vs_local", best_start["s3"], best_start["local"], "s", "<= 2", mode="streaming",
               notes=("process start of `sigil-feed serve` (a streaming dataset of plain JSONL and Parquet files, "
                      "bundled tokenizer) to the first 8x1024 batch in the client, the files in a bucket of a local "
                      f"moto_server against the same files on disk; best of {rounds} alternating rounds"),
               details={"runs": starts}),
        Metric("remote_read_vs_local", s3_rate, local_rate, "MB/s", "", mode="streaming",
               notes=(f"every record of {total:.0f} MB of sources (plain JSONL, zstd JSONL, Parquet; bytes as stored) "
                      "read with the server's readers from a bucket of a local moto_server against from disk; "
                      f"best of {rounds} alternating rounds; per format in details"),
               details={"mb_per_s": mb_s, "bytes": sizes, "runs": reads}),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remote_sources", description=__doc__)
    parser.add_argument("--mb", type=int, default=MB, help="MB of JSONL in all")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    for metric in measure(args.mb, args.rounds):
        out: dict[str, Any] = metric.to_json() | {"name": metric.name}
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
