"""Streaming mode against the tokenizer's own limit on the same texts and cores."""

from __future__ import annotations

from typing import Any

from bench.common import Metric, Work, alternate, best, run_module


def streaming_epoch(work: Work, target: str, dataset: str) -> dict[str, Any]:
    """One whole streaming epoch (epochs: 1) read by a client process, Open to end of stream."""
    result: dict[str, Any] = run_module(
        "bench.feed_client", ["--target", target, "--dataset", dataset, "--api", "stream", "--warmup", "0",
                              "--shape", "16x4096"], log=work.path("logs", f"feed-{dataset}-epoch.log"))
    return result["shapes"]["16x4096"]


def tokenizer_limit(work: Work) -> dict[str, Any]:
    """encode_batch_fast over the same curated texts, in memory, on every core."""
    return run_module("bench.tokenizer_limit", ["--tokenizer", str(work.tokenizer), *map(str, work.sources)],
                      log=work.path("logs", "tokenize-all-threads.log"))


def streaming_vs_tokenizer_limit(work: Work, target: str, dataset: str) -> tuple[Metric, dict[str, Any]]:
    """Tokens/s of a streaming epoch vs the tokenizer alone, best of alternating runs; and the best epoch."""
    epochs, limits = alternate(work.reps, lambda: streaming_epoch(work, target, dataset), lambda: tokenizer_limit(work))
    epoch, limit = best(epochs, "tokens_per_s"), best(limits, "tokens_per_s")
    same = "same" if epoch["tokens"] == limit["tokens"] else f"differ: {epoch['tokens']} vs {limit['tokens']}"
    return Metric("streaming_vs_tokenizer_limit", epoch["tokens_per_s"], limit["tokens_per_s"], "tokens/s", ">= 0.8",
                  mode=epoch["mode"],
                  notes=(f"best of {work.reps} alternating runs of each side; one epoch of"
                         f" {epoch['tokens'] / 1e6:.2f} M real tokens, 16x4096 packed, Open to end "
                         f"({epoch['wall_s']:.1f} s, client in its own process) vs encode_batch_fast of the "
                         f"{limit['samples']} curated texts already in memory, chunks of 1024, every core "
                         f"({limit['encode_s']:.1f} s); token counts {same}"),
                  details={"sigil": epoch, "tokenizer": limit}), epoch
