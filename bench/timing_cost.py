"""What the client's step timing (issue 17) costs the training process: `python -m bench.timing_cost`.

Two measurements: the timer's own cost per step (a tight loop, no I/O), and the CPU seconds per million
tokens of a FeedDataset consumer with timing on and off against one real server (the embedded default
dataset), alternating the two sides. The budget is `client_cpu_vs_inprocess` (<= 0.02 of the in-process
baseline, measured at 0.012 / 3.58 CPU s per M tokens: about 0.06 CPU s per M tokens of headroom).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import Server, alternate, best, run_module

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "server" / "default" / "default.yaml"


def timer_cost_us(steps: int = 200_000) -> float:
    """Microseconds of CPU per step for waiting() + served() + report()."""
    from sigil_feed.client.timing import StepTimer

    timer = StepTimer()
    start = time.process_time()
    for _ in range(steps):
        timer.waiting()
        timer.served()
        timer.report()
    return (time.process_time() - start) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window of each consumer run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shape", default="16x512")
    args = parser.parse_args()
    per_step_us = timer_cost_us()
    with tempfile.TemporaryDirectory() as tmp, Server(DEFAULT_CONFIG, Path(tmp) / "server.log") as server:
        def consume(*flags: str) -> dict:
            result = run_module("bench.feed_client", ["--target", server.target, "--shape", args.shape,
                                                      "--seconds", str(args.seconds), *flags])
            return result["shapes"][args.shape]

        on, off = alternate(args.rounds, consume, lambda: consume("--no-timing"))
    on_best, off_best = best(on, "cpu_s_per_mtok", low=True), best(off, "cpu_s_per_mtok", low=True)
    batch, seq = map(int, args.shape.split("x"))
    print(f"timer: {per_step_us:.2f} us CPU per step = {per_step_us / (16 * 4096):.6f} CPU s per M "
          f"tokens at 16x4096")
    print(f"FeedDataset {args.shape}, CPU s per M tokens (best of {args.rounds}): timing on "
          f"{on_best['cpu_s_per_mtok']:.4f} {on_best['runs']}, off {off_best['cpu_s_per_mtok']:.4f} "
          f"{off_best['runs']}; {on_best['batches_per_s']:.0f} vs {off_best['batches_per_s']:.0f} batches/s "
          f"({batch * seq} ids per batch)")


if __name__ == "__main__":
    main()
