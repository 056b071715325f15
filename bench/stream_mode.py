"""Streaming mode against HF's tokenizer, the encode backend in use, and the reading floor, on the same texts."""

from __future__ import annotations

import re
from typing import Any

from bench.common import Metric, Server, Work, alternate, best, run_module

BACKEND_LINE = re.compile(r"encoding with (fastokens|HF tokenizers)")


def streaming_epoch(work: Work, target: str, dataset: str) -> dict[str, Any]:
    """One whole streaming epoch (epochs: 1) read by a client process, Open to end of stream."""
    result: dict[str, Any] = run_module(
        "bench.feed_client", ["--target", target, "--dataset", dataset, "--api", "stream", "--warmup", "0",
                              "--shape", "16x4096"], log=work.path("logs", f"feed-{dataset}-epoch.log"))
    return result["shapes"]["16x4096"]


def tokenizer_limit(work: Work, backend: str) -> dict[str, Any]:
    """The backend's batched encoding of the same curated texts, in memory, on every core."""
    return run_module("bench.tokenizer_limit", ["--tokenizer", str(work.tokenizer), "--backend", backend,
                                                *map(str, work.sources)],
                      log=work.path("logs", f"tokenize-all-threads-{backend}.log"))


def read_limit(work: Work) -> dict[str, Any]:
    """Only reading and parsing the same sources with the server's JSONL reader."""
    return run_module("bench.read_limit", list(map(str, work.sources)), log=work.path("logs", "read-limit.log"))


def server_backend(server: Server) -> str:
    """The encode backend the server chose for its streaming datasets (from its log)."""
    found = {m.group(1) for line in server.output for m in [BACKEND_LINE.search(line)] if m}
    return "hf" if found == {"HF tokenizers"} else "fastokens" if found == {"fastokens"} else "/".join(sorted(found))


def streaming_metrics(work: Work, server: Server, dataset: str) -> tuple[list[Metric], dict[str, Any]]:
    """Tokens/s of a streaming epoch vs HF alone, vs the backend in use alone, and vs only reading the sources;
    best of alternating runs of each side; and the best epoch."""
    backend = server_backend(server)
    limit_backend = "fastokens" if backend == "fastokens" else "hf"
    epochs, hfs, limits, reads = alternate(work.reps, lambda: streaming_epoch(work, server.target, dataset),
                                           lambda: tokenizer_limit(work, "hf"),
                                           lambda: tokenizer_limit(work, limit_backend), lambda: read_limit(work))
    epoch, hf, limit = best(epochs, "tokens_per_s"), best(hfs, "tokens_per_s"), best(limits, "tokens_per_s")
    read = best(reads, "read_s", low=True)
    same = "same" if epoch["tokens"] == hf["tokens"] else f"differ: {epoch['tokens']} vs {hf['tokens']}"
    what = (f"best of {work.reps} alternating runs of each side; one epoch of {epoch['tokens'] / 1e6:.2f} M real "
            f"tokens, 16x4096 packed, Open to end ({epoch['wall_s']:.1f} s, client in its own process, server "
            f"encoding with {backend})")
    metrics = [
        Metric("streaming_vs_hf_tokenizer", epoch["tokens_per_s"], hf["tokens_per_s"], "tokens/s", ">= 5",
               mode=epoch["mode"], notes=(f"{what} vs HF encode_batch_fast of the {hf['samples']} curated texts "
                                          f"already in memory, chunks of 1024, every core ({hf['encode_s']:.1f} s); "
                                          f"token counts {same}"),
               details={"sigil": epoch, "tokenizer": hf}),
        Metric("streaming_vs_tokenizer_limit", epoch["tokens_per_s"], limit["tokens_per_s"], "tokens/s", ">= 0.8",
               mode=epoch["mode"], notes=(f"{what} vs the backend in use ({limit_backend}) alone on the same texts "
                                          f"in memory, chunks of 1024, every core ({limit['encode_s']:.2f} s)"),
               details={"sigil": epoch, "tokenizer": limit}),
        Metric("streaming_vs_read_limit", epoch["tokens_per_s"], epoch["tokens"] / read["read_s"], "tokens/s", "",
               mode=epoch["mode"], notes=(f"{what} vs reading and parsing the same sources with the server's JSONL "
                                          f"reader alone ({read['records']} records in {read['read_s']:.2f} s, no "
                                          "filters, no tokenizer), as the epoch's tokens over that time"),
               details={"sigil": epoch, "read": read}),
    ]
    return metrics, epoch
