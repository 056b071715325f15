"""Server memory: peak RSS streaming a corpus 10x larger vs 1x, and RSS while a client stalls."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Metric, Server, Work, repeat_files, subset_jsonl, write_config
from sigil_feed.client.stream import BatchStream, FeedBatch

MB = 1 << 20


def _stream_to_end(target: str, batch: int, seq: int) -> tuple[int, float]:
    """Read every batch of a one-epoch stream; (tokens, seconds)."""
    t0 = time.perf_counter()
    tokens = 0
    with BatchStream(target, "default", batch_size=batch, seq_len=seq, prefetch=4) as stream:
        for item in stream:
            if isinstance(item, FeedBatch):
                tokens += item.tokens
    return tokens, time.perf_counter() - t0


def _peak_rss(work: Work, name: str, sources: list[Path], block: int) -> dict[str, Any]:
    config = write_config(work.path(f"rss-{name}.yaml"), work, sources, seq_len=2048, use_cache=False, epochs=1,
                          shuffle_block=block)
    with Server(config, work.path("logs", f"rss-{name}.log")) as server:
        idle = server.memory.rss()
        tokens, seconds = _stream_to_end(server.target, 8, 2048)
        peak = server.memory.peak()
    return {"peak_mb": peak / MB, "idle_mb": idle / MB, "tokens": tokens, "seconds": seconds,
            "corpus_mb": sum(s.stat().st_size for s in sources) / MB}


def streaming_rss_ratio(work: Work) -> Metric:
    """Peak server RSS over a whole streaming epoch of a 10x corpus (10 copies of each file) vs 1x."""
    # --quick: a smaller 1x so that the 10x epoch fits the budget, and shuffle blocks small enough that the
    # 1x corpus still spans several of them (a corpus smaller than one block never fills the block buffer).
    block = 128 if work.quick else 4096
    if work.quick:
        base = [subset_jsonl(s, work.path("rss-1x", s.name), s.stat().st_size // 4) for s in work.sources]  # 1.5 MB
    else:
        base = work.sources
    big = repeat_files(base, work.root / "rss-10x", 10)
    one = _peak_rss(work, "1x", base, block)
    ten = _peak_rss(work, "10x", big, block)
    return Metric("streaming_rss_ratio", ten["peak_mb"], one["peak_mb"], "MB peak RSS", "<= 1.1", mode="streaming",
                  notes=(f"server peak RSS (the kernel's VmHWM) over one full epoch, "
                         f"shuffle_block {block}, "
                         f"{one['corpus_mb']:.0f} MB vs {ten['corpus_mb']:.0f} MB of JSONL; idle after "
                         f"start-up {one['idle_mb']:.0f} / {ten['idle_mb']:.0f} MB"),
                  details={"1x": one, "10x": ten, "shuffle_block": block})


@dataclass
class Stall:
    """Streams that were read a little and then left unread, on one server; RSS before and during."""

    server: Server
    streams: list[BatchStream]
    before: int
    started: float


def stall_begin(server: Server, datasets: list[str], batch: int = 16, seq: int = 4096) -> Stall:
    """Open a stream per dataset, read 8 batches from each, then stop reading; RSS once it has settled."""
    streams = []
    for name in datasets:
        stream = BatchStream(server.target, name, batch_size=batch, seq_len=seq, prefetch=4)
        taken = 0
        for item in stream:
            taken += isinstance(item, FeedBatch)
            if taken == 8:
                break
        streams.append(stream)
    time.sleep(2.0)  # let the server fill the granted credits and the client's buffer
    server.memory.reset_peak()
    return Stall(server, streams, server.memory.rss(), time.monotonic())


def stall_end(stall: Stall, seconds: float, datasets: list[str]) -> Metric:
    """Wait out the stall, then compare RSS after it with RSS before it."""
    time.sleep(max(0.0, seconds - (time.monotonic() - stall.started)))
    after, peak = stall.server.memory.rss(), stall.server.memory.peak()
    for stream in stall.streams:
        stream.close()
    return Metric("stalled_client_rss_ratio", after / MB, stall.before / MB, "MB RSS", "<= 1.05",
                  mode="+".join(datasets),
                  notes=(f"{len(stall.streams)} clients (datasets {', '.join(datasets)}) read 8 batches of 16x4096, "
                         f"then stopped reading for {seconds:.0f} s; peak during the stall {peak / MB:.0f} MB"),
                  details={"stall_s": seconds, "peak_mb": peak / MB})
