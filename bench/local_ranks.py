"""Server CPU per streaming epoch with 8 local ranks vs 1 rank, on the same server and dataset.

`python -m bench.local_ranks --target T --dataset D --world W --shape BxL` is the worker: it reads one whole
epoch on every rank of a W-rank layout at once (a thread per rank) and prints the ranks' totals.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time
from typing import Any

from bench.common import Metric, Server, Work, alternate, best, emit, run_module

RANKS = 8
SHAPE = "8x2048"


def _read_rank(target: str, dataset: str, rank: int, world: int, shape: str, out: dict[int, dict[str, Any]]) -> None:
    from sigil_feed.client.stream import BatchStream, FeedBatch

    batch, seq = map(int, shape.split("x"))
    digest, tokens, batches = hashlib.sha256(), 0, 0
    with BatchStream(target, dataset, batch_size=batch, seq_len=seq, rank=rank, world_size=world,
                     prefetch=8, report_timing=False) as stream:
        for item in stream:
            if isinstance(item, FeedBatch):
                digest.update(item.arrays["input_ids"].tobytes())
                tokens, batches = tokens + item.tokens, batches + 1
    out[rank] = {"tokens": tokens, "batches": batches, "sha256": digest.hexdigest()}


def epoch_cpu(server: Server, dataset: str, world: int, work: Work) -> dict[str, Any]:
    """Server CPU seconds for one epoch read by all `world` ranks at once (a one-epoch dataset)."""
    cpu0, t0 = server.memory.cpu_s(), time.perf_counter()
    ranks = run_module("bench.local_ranks", ["--target", server.target, "--dataset", dataset, "--world", str(world),
                                             "--shape", SHAPE], log=work.path("logs", f"local-ranks-{world}.log"))
    return {"cpu_s": server.memory.cpu_s() - cpu0, "wall_s": time.perf_counter() - t0, **ranks}


def streaming_cpu_8_vs_1_ranks(work: Work, server: Server, dataset: str) -> Metric:
    """Server CPU seconds per epoch: 8 ranks of one layout streaming at once vs 1 rank; lowest of alternating runs."""
    eights, ones = alternate(work.reps, lambda: epoch_cpu(server, dataset, RANKS, work),
                             lambda: epoch_cpu(server, dataset, 1, work))
    eight, one = best(eights, "cpu_s", low=True), best(ones, "cpu_s", low=True)
    same = "same" if eight["tokens"] == one["tokens"] else f"differ: {eight['tokens']} vs {one['tokens']}"
    return Metric("streaming_cpu_8_vs_1_ranks", eight["cpu_s"], one["cpu_s"], "server CPU s per epoch", "<= 1.1",
                  mode="streaming",
                  notes=(f"one streaming epoch ({one['tokens'] / 1e6:.2f} M real tokens, {SHAPE} packed) read by "
                         f"{RANKS} ranks at once (one client process, a thread per rank) vs by 1 rank, same server; "
                         f"lowest server CPU (user + system) of {work.reps} alternating runs each; token totals "
                         f"{same}"),
                  details={"8_ranks": eight, "1_rank": one})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--shape", default=SHAPE)
    args = parser.parse_args()
    out: dict[int, dict[str, Any]] = {}
    threads = [threading.Thread(target=_read_rank, args=(args.target, args.dataset, r, args.world, args.shape, out))
               for r in range(args.world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(out) != args.world:
        raise SystemExit(f"only ranks {sorted(out)} of {args.world} finished")
    emit({"tokens": sum(r["tokens"] for r in out.values()), "batches": sum(r["batches"] for r in out.values()),
          "ranks": [out[r] for r in range(args.world)]})


if __name__ == "__main__":
    main()
