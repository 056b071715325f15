"""A small stream's per-batch latency with and without a greedy neighbour on the same server.

The small client (8x512, one batch granted at a time, so each batch is a round trip) runs in its own process
and reports the p99 of the time from asking for a batch to holding it; the neighbour, in another process,
pulls the largest batches the default limits allow as fast as it can. The ratio is p99 loaded / p99 alone:
near 1 when no client's batches can stall the event loop that serves the others.

`python -m bench.neighbour small|greedy TARGET SECONDS` runs one side (bench/__main__.py starts both).
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time

from bench.common import PYTHON, REPO, Metric, Work, emit, run_module

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


def greedy(target: str, batch: int, seq_len: int) -> None:
    """Pull batches of batch x seq_len as fast as they come, without decoding them, until killed."""
    import grpc

    from sigil_feed.protos import feed_pb2, feed_pb2_grpc

    requests: queue.SimpleQueue[feed_pb2.StreamRequest] = queue.SimpleQueue()
    requests.put(feed_pb2.StreamRequest(open=feed_pb2.Open(batch_size=batch, seq_len=seq_len, credits=2)))
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        for response in feed_pb2_grpc.DataFeedStub(channel).Stream(iter(requests.get, None)):
            if response.HasField("batch"):
                requests.put(feed_pb2.StreamRequest(credit=feed_pb2.Credit(credits=1)))


def small_stream_p99_vs_greedy_neighbour(work: Work, target: str) -> Metric:
    """p99 of a small stream's batch latency beside a greedy neighbour, over the same without one."""
    seconds = work.seconds
    run = ["bench.neighbour", "small", target, str(seconds)]
    alone = run_module(run[0], run[1:], log=work.path("logs", "neighbour-alone.log"))
    batch, seq_len = GREEDY["quick" if work.quick else "full"]
    neighbour = subprocess.Popen([PYTHON, "-m", "bench.neighbour", "greedy", target, str(batch), str(seq_len)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)  # its stream opened and batches flowing
        loaded = run_module(run[0], run[1:], log=work.path("logs", "neighbour-loaded.log"))
    finally:
        neighbour.kill()
        neighbour.wait()
    return Metric("small_stream_p99_vs_greedy_neighbour", loaded["p99_ms"], alone["p99_ms"], "ms p99 per batch",
                  "<= 3", mode="cached",
                  notes=f"{SMALL[0]}x{SMALL[1]} stream, one batch granted at a time; neighbour pulls "
                        f"{batch}x{seq_len} batches", details={"alone": alone, "loaded": loaded})


if __name__ == "__main__":
    if sys.argv[1] == "small":
        small(sys.argv[2], float(sys.argv[3]))
    else:
        greedy(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
