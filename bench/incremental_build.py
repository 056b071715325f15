"""Data that grows, and data that moves: what a token store costs when the corpus changes.

1. Incremental build: the corpus cut into FILES files; a store built over 90% of them; then 10% new files land in
   the glob and `sigil-feed cache build` builds the new store (only the new shards: the others are taken from the
   first store). Baseline: a full build of the whole corpus into an empty cache folder, same run. Target: the
   incremental build costs about the new data's share of the full build.
2. Identity at start: the content identity of every file of the corpus (size and xxh3-128 of every byte) with no
   digest sidecar (a first start, or data copied to a new path) against a start that finds the sidecar (only
   `stat`s), same run.

`python -m bench.incremental_build [--corpus DIR] [--mb 90] [--files 20]` runs it alone; `python -m bench` runs it
with the rest. Build times are the builder's own (its "token store ready ... s" line: tokenizer loaded, store
committed), the command's wall time beside them in the details.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import Metric, Work, find_corpus, make_tokenizer_dir
from sigil_feed.server.pipeline.sources.identity import DigestCache

FILES = 20  # the corpus is cut into this many files; the last 10% of them are the new data
NEW_SHARE = 0.1
READY = re.compile(r"token store ready: .*?(\d+) shards: (\d+) written, (\d+) complete from before, (\d+) taken "
                   r"from the dataset's other stores; ([\d.]+) s\)")


def cut(sources: list[Path], dest: Path, files: int, max_bytes: int | None) -> list[Path]:
    """The corpus's lines (up to max_bytes in all), dealt round-robin into `files` JSONL files of about one size."""
    dest.mkdir(parents=True, exist_ok=True)
    outs = [(dest / f"part-{k:03d}.jsonl").open("wb") for k in range(files)]
    written = 0
    try:
        k = 0
        for source in sources:
            with source.open("rb") as lines:
                for line in lines:
                    if max_bytes is not None and written + len(line) > max_bytes:
                        break
                    outs[k % files].write(line)
                    written += len(line)
                    k += 1
    finally:
        for out in outs:
            out.close()
    return sorted(dest.glob("part-*.jsonl"))


def config(path: Path, tokenizer: Path, data: Path, cache: Path) -> Path:
    """A cached dataset over every JSONL file in `data`, stored under `cache`."""
    body = {"model_name": str(tokenizer), "max_seq_len": 4096, "pack": True,
            "dataset": {"names": [f"local:{data}/*.jsonl"], "use_cache": True, "cache_dir": str(cache),
                        "shuffle_seed": 0}}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def cache_build(config_path: Path, log: Path) -> dict[str, Any]:
    """`sigil-feed cache build`, timed; the builder's own line parsed (shards written, reused, seconds)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "cache", "build", "--config",
                           str(config_path)], capture_output=True, text=True, timeout=7200,
                          env={**os.environ, "SIGIL_FEED_CACHE": str(config_path.parent / "home-cache")})
    wall = time.perf_counter() - t0
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"cache build failed ({done.returncode}); see {log}")
    match = READY.search(done.stderr + done.stdout)
    if match is None:
        raise RuntimeError(f"no 'token store ready' line in {log}")
    shards, written, complete, taken, build_s = match.groups()
    return {"wall_s": wall, "build_s": float(build_s), "shards": int(shards), "written": int(written),
            "complete": int(complete), "taken": int(taken)}


def incremental(root: Path, tokenizer: Path, parts: list[Path]) -> Metric:
    """Build over 90% of the parts, add the rest, build again (timed); a full build of all parts is the baseline."""
    new = max(1, round(len(parts) * NEW_SHARE))
    old, added = parts[:-new], parts[-new:]
    data = root / "grows"
    data.mkdir()
    for part in old:
        os.link(part, data / part.name)
    grows = config(root / "grows.yaml", tokenizer, data, root / "cache-grows")
    first = cache_build(grows, root / "build-90.log")
    for part in added:
        os.link(part, data / part.name)
    step = cache_build(grows, root / "build-10-new.log")
    full = cache_build(config(root / "full.yaml", tokenizer, root / "parts", root / "cache-full"),
                       root / "build-full.log")
    share = sum(p.stat().st_size for p in added) / sum(p.stat().st_size for p in parts)
    return Metric("incremental_build_10pct_vs_full", step["build_s"], full["build_s"], "s",
                  "<= 0.2",
                  notes=f"{len(added)} of {len(parts)} files new ({share:.1%} of the bytes): the incremental build "
                        "against a full build of all of them, same run; both hold the fixed cost of a process's "
                        "first shard (pyarrow's first numpy conversion imports pandas)",
                  details={"incremental": step, "full": full, "first_90pct": first, "new_bytes_share": share})


def identity_cost(parts: list[Path], root: Path) -> Metric:
    """Every part's identity with an empty digest sidecar (every byte hashed) against one that has them."""
    paths = [str(p) for p in parts]
    sidecar = root / "digests.json"
    t0 = time.perf_counter()
    cold = DigestCache(sidecar)
    cold.identities(paths)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = DigestCache(sidecar)
    warm.identities(paths)
    warm_s = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in parts)
    assert cold.hashed == len(parts) and warm.hashed == 0
    return Metric("identity_warm_vs_cold_s", warm_s, cold_s, "s", "",
                  notes=f"content identity of {len(parts)} files, {size / 1e6:.0f} MB: the digest sidecar found "
                        "(stat only) against none (every byte hashed, xxh3-128; page cache warm)",
                  details={"bytes": size, "cold_mb_per_s": size / 1e6 / cold_s})


def measure(work: Work, *, files: int = FILES) -> list[Metric]:
    """Both measurements on the work's corpus sources (their whole size, or the --quick subset)."""
    root = Path(tempfile.mkdtemp(prefix="incremental-", dir=work.root))
    parts = cut(work.sources, root / "parts", files, None)
    return [incremental(root, work.tokenizer, parts), identity_cost(parts, root)]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.incremental_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="folder with code.jsonl and pairs.jsonl (env SIGIL_FEED_CORPUS)")
    parser.add_argument("--mb", type=float, default=90.0, help="MB of the corpus to use (default 90)")
    parser.add_argument("--files", type=int, default=FILES, help=f"files to cut it into (default {FILES})")
    args = parser.parse_args()
    corpus = find_corpus(args.corpus)
    with tempfile.TemporaryDirectory(prefix="sigil-bench-incremental-") as folder:
        root = Path(folder)
        tokenizer = make_tokenizer_dir(root / "tokenizer")
        parts = cut([corpus / "pairs.jsonl", corpus / "code.jsonl"], root / "parts", args.files,
                    int(args.mb * 1e6))
        metrics = [incremental(root, tokenizer, parts), identity_cost(parts, root)]
    print(json.dumps({m.name: m.to_json() for m in metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
