"""A training process's view of sigil-feed: consume batches and report rate and CPU (run as a subprocess).

`--api dataset` iterates FeedDataset (torch tensors, what a trainer uses) and counts ids delivered;
`--api stream` iterates BatchStream and counts the real (unpadded) tokens the server reports. Each
`--shape BxL` is one stream, measured in turn; the result maps each shape to its numbers.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

from bench.common import emit

Batches = Iterator[tuple[int, int, str]]  # (tokens, token-id bytes on the wire, server mode) per batch


def _dataset_batches(args: argparse.Namespace, batch: int, seq: int) -> Batches:
    from sigil_feed.client.dataset import FeedDataset

    dataset = FeedDataset(args.target, args.dataset, batch_size=batch, seq_len=seq, prefetch=args.prefetch,
                          report_timing=not args.no_timing)
    for tensors in dataset:
        ids = tensors["input_ids"]
        yield ids.numel(), ids.numel() * 4, dataset.info.mode if dataset.info else ""


def _stream_batches(args: argparse.Namespace, batch: int, seq: int) -> Batches:
    from sigil_feed.client.stream import BatchStream, FeedBatch

    with BatchStream(args.target, args.dataset, batch_size=batch, seq_len=seq, prefetch=args.prefetch,
                     report_timing=not args.no_timing) as stream:
        for item in stream:
            if isinstance(item, FeedBatch):
                yield item.tokens, item.arrays["input_ids"].size * 4, stream.info.mode


def measure(source: Batches, args: argparse.Namespace) -> dict[str, Any]:
    """Consume one stream: warm-up batches, then the clock (to the end, a time or a token budget)."""
    opened = time.perf_counter()
    t0, cpu0 = opened, time.process_time()
    first_batch_s = None
    batches = tokens = id_bytes = 0
    mode = ""
    for n, (batch_tokens, batch_bytes, batch_mode) in enumerate(source):
        mode = batch_mode
        now = time.perf_counter()
        if first_batch_s is None:
            first_batch_s = now - opened
        if n < args.warmup:
            if n == args.warmup - 1:
                t0, cpu0 = now, time.process_time()
            continue
        batches += 1
        tokens += batch_tokens
        id_bytes += batch_bytes
        if (args.seconds and now - t0 >= args.seconds) or (args.max_tokens and tokens >= args.max_tokens):
            break
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"batches": batches, "tokens": tokens, "id_bytes": id_bytes, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": tokens / wall if wall else 0.0, "bytes_per_s": id_bytes / wall if wall else 0.0,
            "batches_per_s": batches / wall if wall else 0.0,
            "cpu_s_per_mtok": cpu / tokens * 1e6 if tokens else None, "first_batch_s": first_batch_s,
            "open_to_end_s": time.perf_counter() - opened, "mode": mode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--shape", action="append", required=True, help="BATCHxSEQ_LEN, e.g. 16x4096; repeatable")
    parser.add_argument("--prefetch", type=int, default=8)
    parser.add_argument("--api", choices=("dataset", "stream"), default="dataset")
    parser.add_argument("--no-timing", action="store_true", help="do not report step timing to the server")
    parser.add_argument("--warmup", type=int, default=3, help="batches before the clock starts")
    parser.add_argument("--seconds", type=float, default=0.0, help="measure this long (0: to the stream's end)")
    parser.add_argument("--max-tokens", type=int, default=0, help="stop after this many tokens (0: no limit)")
    args = parser.parse_args()
    if args.api == "dataset":
        import torch  # imported before any clock: the trainer has torch loaded anyway

        torch.set_num_threads(1)
    batches = _dataset_batches if args.api == "dataset" else _stream_batches
    shapes = {}
    for shape in args.shape:
        batch, seq = map(int, shape.split("x"))
        shapes[shape] = measure(batches(args, batch, seq), args)
    emit({"shapes": shapes})


if __name__ == "__main__":
    main()
