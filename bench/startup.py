"""Start-up: `sigil-feed serve` on a warm cache to the first batch in a client, with its parts."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, REPO, Metric, Server, Work
from sigil_feed.client.stream import BatchStream, FeedBatch


def _wall(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([PYTHON, "-c", code], check=True, cwd=REPO, capture_output=True)
    return time.perf_counter() - t0


def startup_parts(tokenizer: Path) -> dict[str, float]:
    """Seconds for a bare interpreter, for importing the server, for importing transformers' AutoTokenizer
    (which imports torch), for AutoTokenizer.from_pretrained, and for the lean alternative
    (`tokenizers.Tokenizer.from_file`, import included)."""
    path = str(tokenizer)
    timed = ("import time; t = time.perf_counter(); from transformers import AutoTokenizer; "
             f"u = time.perf_counter(); AutoTokenizer.from_pretrained({path!r}); v = time.perf_counter(); "
             "print(u - t, v - u)")
    out = subprocess.run([PYTHON, "-c", timed], check=True, cwd=REPO, capture_output=True, text=True)
    import_s, load_s = map(float, out.stdout.split()[-2:])
    return {"interpreter_s": _wall("pass"),
            "server_imports_s": _wall("import sigil_feed.server.cli, sigil_feed.server.rpc.app"),
            "autotokenizer_import_s": import_s, "autotokenizer_load_s": load_s,
            "tokenizers_from_file_s": _wall(f"from tokenizers import Tokenizer; "
                                            f"Tokenizer.from_file({str(tokenizer / 'tokenizer.json')!r})")}


def first_batch(config: Path, log: Path, dataset: str = "default") -> dict[str, Any]:
    """Start a server, wait for its first 16x4096 batch in this process, stop it."""
    with Server(config, log) as server:
        with BatchStream(server.target, dataset, batch_size=16, seq_len=4096, prefetch=2) as stream:
            mode = stream.info.mode
            next(item for item in stream if isinstance(item, FeedBatch))
        total = time.monotonic() - server.started
    return {"first_batch_s": total, "listening_s": server.listening_s, "mode": mode}


def _stores(cache_dir: Path) -> set[str]:
    return {p.parent.name for p in cache_dir.glob("*/manifest.json")}


def warm_first_batch(work: Work, config: Path, cache_dir: Path) -> Metric:
    """The median over a few starts on an existing (warm) token store; a start that built a store is redone."""
    runs: list[dict[str, Any]] = []
    rebuilt = 0
    while len(runs) < (2 if work.quick else 5) and rebuilt < 2:
        before = _stores(cache_dir)
        run = first_batch(config, work.path("logs", f"warm-{len(runs) + rebuilt}.log"))
        if _stores(cache_dir) != before:  # the store was not reusable (e.g. the server changed under us)
            rebuilt += 1
            continue
        runs.append(run)
    if not runs:
        raise RuntimeError("every start rebuilt the token store: it is not reused across restarts")
    parts = startup_parts(work.tokenizer)
    value = statistics.median(r["first_batch_s"] for r in runs)
    listening = statistics.median(r["listening_s"] for r in runs)
    return Metric("warm_first_batch_s", value, None, "s", "<= 3", mode=runs[0]["mode"],
                  notes=(f"median of {len(runs)} starts; of which process start to 'listening' {listening:.2f} s. "
                         f"Separately, each in a fresh interpreter: bare interpreter {parts['interpreter_s']:.2f} s; "
                         f"+ server imports {parts['server_imports_s']:.2f} s; `from transformers import "
                         f"AutoTokenizer` (imports torch) {parts['autotokenizer_import_s']:.2f} s, then "
                         f"from_pretrained {parts['autotokenizer_load_s']:.2f} s; the lean alternative, interpreter + "
                         f"tokenizers.Tokenizer.from_file, {parts['tokenizers_from_file_s']:.2f} s"),
                  details={"runs": runs, "starts_that_rebuilt_the_store": rebuilt, **parts})
