"""A small stream's per-batch latency with and without a greedy neighbour on the same server.

The small client (8x512, one batch granted at a time, so each batch is a round trip) runs in its own process
and reports the p99 of the time from asking for a batch to holding it; the neighbour, in another process,
pulls the largest batches the default limits allow as fast as it can, as this version's client does: in
1 MiB Parts. The ratio is p99 loaded / p99 alone: near 1 when no client's batches can stall the event loop that
serves the others. The same small stream beside a neighbour that takes whole messages (an older client) is
in the details.

`python -m bench.neighbour small TARGET SECONDS` and `greedy TARGET BATCH SEQ_LEN [--whole]` run one side
(bench/__main__.py starts both); `python -m bench.neighbour measure [--quick] [--reps N]` starts a server on
the bench corpus and measures only this.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, REPO, Metric, Work, emit, find_corpus, prepare, run_module, write_config

SMALL = (8, 512)
GREEDY = {"full": (1024, 32768), "quick": (256, 32768)}


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
    emit({"batches": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))})


def greedy(target: str, batch: int, seq_len: int, parts: bool) -> None:
    """Pull batches of batch x seq_len as fast as they come (in Parts, or whole messages as older clients
    take them), without joining or decoding them, until killed."""
    import grpc

    from sigil_feed.client.parts import Part, stream_method
    from sigil_feed.protos import feed_pb2

    requests: queue.SimpleQueue[feed_pb2.StreamRequest] = queue.SimpleQueue()
    requests.put(feed_pb2.StreamRequest(open=feed_pb2.Open(batch_size=batch, seq_len=seq_len, credits=2,
                                                           accept_parts=parts)))
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        for response in stream_method(channel)(iter(requests.get, None)):
            if response.last if isinstance(response, Part) else response.HasField("batch"):
                requests.put(feed_pb2.StreamRequest(credit=feed_pb2.Credit(credits=1)))


def small_stream_p99_vs_greedy_neighbour(work: Work, target: str) -> Metric:
    """p99 of a small stream's batch latency beside a greedy neighbour, over the same without one."""
    batch, seq_len = GREEDY["quick" if work.quick else "full"]
    alone = _small(work, target, "alone")
    loaded = _small(work, target, "loaded", [str(batch), str(seq_len)])
    old_client = _small(work, target, "loaded-whole", [str(batch), str(seq_len), "--whole"])
    return Metric("small_stream_p99_vs_greedy_neighbour", loaded["p99_ms"], alone["p99_ms"], "ms p99 per batch",
                  "<= 3", mode="cached",
                  notes=f"{SMALL[0]}x{SMALL[1]} stream, one batch granted at a time; neighbour pulls "
                        f"{batch}x{seq_len} batches in Parts (beside one taking whole messages: p99 "
                        f"{old_client['p99_ms']:.1f} ms)",
                  details={"alone": alone, "loaded": loaded, "loaded_beside_whole_messages": old_client})


def _small(work: Work, target: str, name: str, greedy_args: list[str] | None = None) -> dict[str, Any]:
    """The small stream's latencies, beside a greedy neighbour started with these arguments (if any)."""
    neighbour = None
    if greedy_args is not None:
        neighbour = subprocess.Popen([PYTHON, "-m", "bench.neighbour", "greedy", target, *greedy_args], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2.0)  # its stream opened and batches flowing
    try:
        return run_module("bench.neighbour", ["small", target, str(work.seconds)],
                          log=work.path("logs", f"neighbour-{name}.log"))
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def measure(quick: bool, reps: int) -> None:
    """Start a server with a cached store of the bench corpus and print this metric `reps` times."""
    import json

    from bench.build import cold_start

    work = Work(Path(tempfile.mkdtemp(prefix="sigil-neighbour-")), find_corpus(None), quick)
    prepare(work)
    config = write_config(work.path("main.yaml"), work, work.sources, use_cache=True,
                          cache_dir=str(work.path("cache")))
    server = cold_start(config, work.path("logs", "server.log")).server
    try:
        for _ in range(reps):
            print(json.dumps(small_stream_p99_vs_greedy_neighbour(work, server.target).to_json()), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work.root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "small":
        small(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "greedy":
        greedy(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "--whole" not in sys.argv[5:])
    else:
        parser = argparse.ArgumentParser(prog="python -m bench.neighbour measure")
        parser.add_argument("command", choices=["measure"])
        parser.add_argument("--quick", action="store_true", help="the quick corpus subset and 3 s windows")
        parser.add_argument("--reps", type=int, default=1)
        args = parser.parse_args()
        measure(args.quick, args.reps)
