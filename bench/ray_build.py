"""Ray build vs local build: `sigil-feed cache build --engine ray` (a local Ray cluster on this machine's cores)
against `--engine local` on the same corpus in the same run, each into a fresh folder; both must write the same
shards. The corpus is split into files, since a file is the unit of a shard and of a Ray task.

`python -m bench.ray_build [--corpus DIR] [--copies N]` runs it alone: on the quick subset of the Rust corpus
if there is one, else on N copies of the embedded default dataset.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    QUICK_BYTES,
    REPO,
    Metric,
    Work,
    alternate,
    best,
    make_tokenizer_dir,
    subset_jsonl,
    write_config,
)

PARTS = 8  # files per source: Ray's read tasks and shards
READY = re.compile(r"token store ready: .*; ([\d.]+) s\)")
DEFAULT_CORPUS = REPO / "server" / "default" / "default.jsonl"


def split_jsonl(src: Path, dest: Path, parts: int) -> list[Path]:
    """src's lines dealt round-robin into `parts` files under dest (every line kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [dest / f"{src.stem}-{i:02d}.jsonl" for i in range(parts)]
    outs = [f.open("wb") for f in files]
    try:
        with src.open("rb") as inp:
            for i, line in enumerate(inp):
                outs[i % parts].write(line)
    finally:
        for out in outs:
            out.close()
    return files


def timed_build(config: Path, engine: str, log: Path) -> dict[str, Any]:
    """One `cache build` in its own process: wall seconds from start to exit, and the build's own seconds (its
    'token store ready' log line: without interpreter start, config, tokenizer and, for Ray, cluster start)."""
    cmd = [PYTHON, "-m", "sigil_feed.server.cli", "cache", "build", "--config", str(config), "--engine", engine]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    wall = time.monotonic() - t0
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    match = READY.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "build_s": float(match.group(1)), "engine": engine}


def shards(cache_dir: Path) -> list[dict[str, Any]]:
    """The shards of the one store under cache_dir, as its manifest lists them."""
    (manifest,) = cache_dir.glob("*/manifest.json")
    return list(json.loads(manifest.read_text())["shards"])


def ray_build_vs_local(work: Work, sources: list[Path]) -> Metric:
    """Ray's build time / the local engine's (best of work.reps each, alternated), same corpus and run."""
    parts = [p for s in sources for p in split_jsonl(s, work.path("ray-corpus", s.stem), PARTS)]
    runs = iter(range(1 << 20))

    def build(engine: str) -> dict[str, Any]:
        n = next(runs)
        cache = work.path(f"cache-{engine}-{n}")
        config = write_config(work.path(f"build-{engine}-{n}.yaml"), work, parts, use_cache=True, cache_dir=str(cache))
        return {**timed_build(config, engine, work.path("logs", f"build-{engine}-{n}.log")), "cache": str(cache)}

    local_runs, ray_runs = alternate(work.reps, lambda: build("local"), lambda: build("ray"))
    local, ray = best(local_runs, "wall_s", low=True), best(ray_runs, "wall_s", low=True)
    if shards(Path(ray["cache"])) != shards(Path(local["cache"])):
        raise RuntimeError("the Ray and local engines wrote different shards")
    startup = ray["wall_s"] - ray["build_s"] - (local["wall_s"] - local["build_s"])
    notes = (f"{len(parts)} files ({sum(p.stat().st_size for p in parts) / 1e6:.1f} MB), identical shards; "
             f"the build alone (its log line, once Ray is up): Ray {ray['build_s']:.1f} s vs local "
             f"{local['build_s']:.1f} s; starting the local Ray cluster adds about {startup:.1f} s. On one machine "
             "the local engine's tokenizer already uses every core, so Ray only adds its fixed costs (cluster, "
             "worker processes, a tokenizer load per actor, samples through the object store); it pays off "
             "across nodes.")
    return Metric("ray_build_vs_local", ray["wall_s"], local["wall_s"], "s", "", notes=notes, mode="cold build",
                  details={"ray": ray, "local": local})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_build", description=__doc__)
    parser.add_argument("--corpus", help="folder with code.jsonl and pairs.jsonl (quick subset used)")
    parser.add_argument("--copies", type=int, default=16, help="copies of the embedded default without --corpus")
    args = parser.parse_args()

    work = Work(Path(tempfile.mkdtemp(prefix="sigil-ray-bench-")), Path(args.corpus or "."), quick=True)
    work.tokenizer = make_tokenizer_dir(work.root / "tokenizer")
    if args.corpus:
        sources = [subset_jsonl(work.corpus / name, work.path("corpus", name), size)
                   for name, size in QUICK_BYTES.items()]
    else:
        sources = [work.path("corpus", "default.jsonl")]
        sources[0].write_bytes(DEFAULT_CORPUS.read_bytes() * args.copies)
    try:
        metric = ray_build_vs_local(work, sources)
    finally:
        shutil.rmtree(work.root, ignore_errors=True)
    print(json.dumps(metric.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
