"""A small stream's per-batch latency with and without a greedy neighbour on the same server.

The small client (8x512, one batch granted at a time, so each batch is a round trip) runs in its own process
and reports the p99 of the time from asking for a batch to holding it; the neighbour, in another process,
pulls the largest batches the default limits allow as fast as it can, either as this version's client does
(`Open.accept_parts`: 1 MiB or smaller Parts) or as an older client, grpcurl or another language's client does
(whole messages, one write of up to 128 MB each). Each round measures, back to back, the small stream alone,
beside each neighbour, and beside the Parts neighbour served by *another* server process (so the two share
only the machine's cores: the floor that no scheduling inside one server can go below); the rounds alternate so
that a burst of load elsewhere hits every side alike. Each ratio is a round's p99 beside a neighbour over the
same round's p99 alone; the metric is the median over the rounds.

`python -m bench.neighbour small TARGET SECONDS` and `greedy TARGET BATCH SEQ_LEN SECONDS [--whole]` run one
side (bench/__main__.py starts both); `python -m bench.neighbour measure [--quick] [--reps N]` starts a server on
the bench corpus and measures only this.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    REPO,
    Metric,
    Server,
    Work,
    alternate,
    emit,
    find_corpus,
    prepare,
    run_module,
    write_config,
)

SMALL = (8, 512)
GREEDY = {"full": (1024, 32768), "quick": (256, 32768)}
WARMUP_S = 2.5
"""The neighbour's head start: its stream opened and batches flowing before the small stream is timed."""


def small(target: str, seconds: float) -> None:
    """Emit the small stream's per-batch latency percentiles (ms)."""
    import numpy as np

    from sigil_feed.client.stream import BatchStream, FeedBatch

    waits: list[float] = []
    with BatchStream(target, batch_size=SMALL[0], seq_len=SMALL[1], prefetch=1) as stream:
        items = iter(stream)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            asked = time.perf_counter()
            if isinstance(next(items), FeedBatch):
                waits.append(time.perf_counter() - asked)
    ms = np.asarray(waits[20:]) * 1e3  # after a warm-up
    emit({"batches": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
          "max_ms": float(ms.max())})


def greedy(target: str, batch: int, seq_len: int, seconds: float, parts: bool) -> None:
    """Pull batches of batch x seq_len as fast as they come (in Parts, or whole messages as older clients
    take them), without joining or decoding them, for `seconds`; emit the batches and MB per second."""
    import grpc

    from sigil_feed.client.parts import Part, stream_method
    from sigil_feed.protos import feed_pb2

    requests: queue.SimpleQueue[feed_pb2.StreamRequest | None] = queue.SimpleQueue()
    requests.put(feed_pb2.StreamRequest(open=feed_pb2.Open(batch_size=batch, seq_len=seq_len, credits=2,
                                                           accept_parts=parts)))
    batches, size = 0, 0
    start = time.monotonic()
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        call = stream_method(channel)(iter(requests.get, None))
        for response in call:
            size += len(response.data) if isinstance(response, Part) else response.ByteSize()
            if response.last if isinstance(response, Part) else response.HasField("batch"):
                batches += 1
                requests.put(feed_pb2.StreamRequest(credit=feed_pb2.Credit(credits=1)))
            if time.monotonic() - start > seconds:
                break
        call.cancel()
    elapsed = time.monotonic() - start
    emit({"batches_per_s": batches / elapsed, "mb_per_s": size / elapsed / 1e6})


def _small(work: Work, target: str, name: str, neighbour_target: str | None = None,
           greedy_args: list[str] | None = None) -> dict[str, Any]:
    """The small stream's latencies on `target`, beside a greedy neighbour on `neighbour_target` started with
    these arguments (if any), with the neighbour's throughput."""
    neighbour = None
    if greedy_args is not None:
        neighbour = subprocess.Popen(
            [PYTHON, "-m", "bench.neighbour", "greedy", neighbour_target or target, *greedy_args[:2],
             str(WARMUP_S + work.seconds + 1), *greedy_args[2:]],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(WARMUP_S)
    try:
        result = run_module("bench.neighbour", ["small", target, str(work.seconds)],
                            log=work.path("logs", f"neighbour-{name}.log"))
    finally:
        if neighbour is not None:
            out, _ = neighbour.communicate(timeout=60)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            result["neighbour"] = json.loads(lines[-1]) if lines else None
    return result


SIDES = {"parts": "beside a neighbour taking Parts", "whole": "beside a neighbour taking whole messages",
         "elsewhere": "beside a neighbour taking Parts from another server process (only the cores shared)"}


def small_stream_p99_vs_greedy_neighbour(work: Work, target: str, other_target: str | None = None) -> list[Metric]:
    """p99 of a small stream's batch latency beside a greedy neighbour taking Parts, and beside one taking whole
    messages, each over the same round's p99 alone (median over alternated rounds)."""
    batch, seq_len = GREEDY["quick" if work.quick else "full"]
    shape = [str(batch), str(seq_len)]
    steps = [lambda: _small(work, target, "alone"),
             lambda: _small(work, target, "parts", None, shape),
             lambda: _small(work, target, "whole", None, [*shape, "--whole"])]
    if other_target is not None:
        steps.append(lambda: _small(work, target, "elsewhere", other_target, shape))
    rounds = alternate(work.reps, *steps)
    alone = rounds[0]
    sides = dict(zip(["parts", "whole", "elsewhere"], rounds[1:], strict=False))
    ratios = {side: [r["p99_ms"] / a["p99_ms"] for r, a in zip(runs, alone, strict=True)]
              for side, runs in sides.items()}
    p99 = {side: [r["p99_ms"] for r in runs] for side, runs in [("alone", alone), *sides.items()]}
    median = {side: statistics.median(values) for side, values in p99.items()}
    rate = {side: statistics.median(r["neighbour"]["mb_per_s"] for r in runs if r.get("neighbour"))
            for side, runs in sides.items()}
    floor = (f"; beside the same neighbour on another server process: {statistics.median(ratios['elsewhere']):.2f}x "
             "(the cores alone)") if "elsewhere" in ratios else ""
    details = {"rounds": work.reps, "p99_ms": p99, "ratios": ratios, "neighbour_mb_per_s": rate,
               "runs": {"alone": alone, **sides}}
    metrics = []
    for side, name in [("parts", "small_stream_p99_vs_greedy_neighbour"),
                       ("whole", "small_stream_p99_vs_whole_message_neighbour")]:
        metrics.append(Metric(
            name, median[side], median["alone"], "ms p99 per batch", "<= 3", mode="cached",
            ratio=statistics.median(ratios[side]),
            notes=f"{SMALL[0]}x{SMALL[1]} stream, one batch granted at a time, {SIDES[side]} pulling {batch}x"
                  f"{seq_len} batches ({rate[side]:.0f} MB/s); median of {work.reps} alternated rounds, ratios "
                  f"{', '.join(f'{r:.2f}' for r in ratios[side])}{floor}",
            details=details))
    return metrics


class _Window(Work):
    """The run's settings with this measurement's own window length and rounds."""

    def __init__(self, root: Path, corpus: Path, quick: bool, seconds: float | None, reps: int) -> None:
        super().__init__(root, corpus, quick)
        self._seconds, self._reps = seconds, reps

    @property
    def seconds(self) -> float:
        return self._seconds or super().seconds

    @property
    def reps(self) -> int:
        return self._reps


def measure(quick: bool, reps: int, seconds: float | None) -> None:
    """Start a server with a cached store of the bench corpus, and a second one on the same store (the
    neighbour's, for the floor), and print these metrics."""
    from bench.build import cold_start

    work = _Window(Path(tempfile.mkdtemp(prefix="sigil-neighbour-")), find_corpus(None), quick, seconds, reps)
    prepare(work)
    config = write_config(work.path("main.yaml"), work, work.sources, use_cache=True,
                          cache_dir=str(work.path("cache")))
    server = cold_start(config, work.path("logs", "server.log")).server
    other = Server(config, work.path("logs", "other-server.log"))
    try:
        for metric in small_stream_p99_vs_greedy_neighbour(work, server.target, other.target):
            print(json.dumps({metric.name: metric.to_json()}), flush=True)
    finally:
        other.stop()
        server.stop()
        shutil.rmtree(work.root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "small":
        small(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "greedy":
        greedy(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), "--whole" not in sys.argv[6:])
    else:
        parser = argparse.ArgumentParser(prog="python -m bench.neighbour measure")
        parser.add_argument("command", choices=["measure"])
        parser.add_argument("--quick", action="store_true", help="the quick corpus subset and 3 s windows")
        parser.add_argument("--reps", type=int, default=3, help="alternated rounds")
        parser.add_argument("--seconds", type=float, help="each window's length (default 10, 3 with --quick)")
        args = parser.parse_args()
        measure(args.quick, args.reps, args.seconds)
