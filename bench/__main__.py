"""`python -m bench [--quick]`: every comparison of issue 7, each with its baseline in the same run.

Prints a table, writes bench/results.json and draws bench/results.png. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    build,
    cached,
    epoch_waste,
    exact,
    incremental_build,
    local_ranks,
    locality,
    memory,
    mosaic,
    neighbour,
    plot,
    ray_build,
    remote_identities,
    remote_sources,
    shard_cache,
    startup,
    store_open,
    stream_mode,
)
from bench.common import BENCH_DIR, Metric, Work, find_corpus, prepare, skipped, write_config

TARGETS = {"cached_vs_grpc_limit": ("B/s", ">= 0.4"), "streaming_vs_hf_tokenizer": ("tokens/s", ">= 5"),
           "streaming_vs_tokenizer_limit": ("tokens/s", ">= 0.8"), "streaming_vs_read_limit": ("tokens/s", ""),
           "client_cpu_vs_inprocess": ("CPU s / M tokens", "<= 0.02"), "vs_best_local": ("tokens/s", ">= 1.0"),
           "vs_mosaic_streaming": ("tokens/s", ">= 1.0"), "warm_first_batch_s": ("s", "<= 3"),
           "cache_build_vs_hf_single": ("s", ">= 5"), "fast_backend_exact": ("mismatching samples", "<= 0"),
           "streaming_rss_ratio": ("MB peak RSS", "<= 1.1"), "stalled_client_rss_ratio": ("MB RSS", "<= 1.05"),
           "small_stream_p99_vs_greedy_neighbour": ("ms p99 per batch", "<= 3"),
           "small_stream_p99_vs_whole_message_neighbour": ("ms p99 per batch", "<= 3"), "ray_build_vs_local": ("s", ""),
           "cold_shard_cache_first_batch_s": ("s", ""), "bytes_fetched_per_sidecar_over_store": ("bytes", ""),
           "bytes_fetched_per_sidecar_over_share": ("x its share", "<= 1.5"),
           "shuffle_same_file_distance_p10": ("fraction of the epoch", ""),
           "streaming_cpu_8_vs_1_ranks": ("server CPU s per epoch", "<= 1.1"),
           "epoch_pad_repeat_fraction": ("fraction of the epoch", "<= 1"),
           "epoch_drop_loss_fraction": ("fraction of the epoch", "<= 1"), "store_open_s": ("s", ""),
           "remote_first_batch_vs_local": ("s", "<= 2"), "remote_read_vs_local": ("MB/s", ""),
           "remote_identify_listing_vs_head": ("s", ""),
           "incremental_build_10pct_vs_full": ("s", "<= 0.2"), "identity_warm_vs_cold_s": ("s", "")}
STALL_DATASETS = ["default", "stream"]


class Background(threading.Thread):
    """A step run beside the main sequence."""

    def __init__(self, step: Callable[[], None]) -> None:
        super().__init__(target=step, daemon=True)
        self.start()


class Runner:
    """Runs the comparisons in order, logging progress; a failing one becomes a 'not measured' row."""

    def __init__(self, work: Work) -> None:
        self.work = work
        self.metrics: dict[str, Metric] = {}
        self.t0 = time.monotonic()

    def log(self, message: str) -> None:
        """Progress on stderr with the elapsed time."""
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def guard(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one step; on failure record every metric it owed as not measured, and go on."""
        self.log(f"{name} ...")
        try:
            return fn()
        except Exception as err:
            self.log(f"{name} FAILED: {type(err).__name__}: {err}")
            for metric in [m for m in TARGETS if m.startswith(name) or name.startswith(m)]:
                self.metrics.setdefault(metric, skipped(metric, *TARGETS[metric], f"{type(err).__name__}: {err}"))
            return None

    def add(self, metric: Metric | None) -> None:
        """Record a metric and log it."""
        if metric is not None:
            self.metrics[metric.name] = metric
            self.log(f"  {metric.name}: {_fmt(metric.value)} vs {_fmt(metric.baseline)} -> {_fmt(metric.ratio)}")


def run_all(work: Work, mosaic_venv: Path) -> dict[str, Metric]:
    """Every comparison, in an order that keeps the measurements from overlapping (but the stall's wait)."""
    r = Runner(work)
    prepare(work)
    config = write_config(work.path("main.yaml"), work, work.sources, use_cache=True,
                          cache_dir=str(work.path("cache")),
                          datasets={"once": {"use_cache": False, "epochs": 1, "remainder": "keep"},
                                    "stream": {"use_cache": False}})
    r.log(f"corpus {[str(s) for s in work.sources]}; cold start of the main server (builds the token store)")
    cold = build.cold_start(config, work.path("logs", "main-server.log"))
    r.log(f"main server at {cold.server.target}; store build {cold.build_s} s; cached={cold.cached}")
    try:
        result = r.guard("cached_vs_grpc_limit", lambda: cached.cached_vs_grpc_limit(work, cold.server.target))
        feeds = result[1] if result else {}
        if result:
            r.add(result[0])
        for metric in r.guard("small_stream_p99_vs", lambda: neighbour.small_stream_p99_vs_greedy_neighbour(
                work, cold.server.target)) or []:
            r.add(metric)
        streaming = r.guard("streaming_vs", lambda: stream_mode.streaming_metrics(work, cold.server, "once"))
        epoch = streaming[1] if streaming else None
        for metric in streaming[0] if streaming else []:
            r.add(metric)
        r.add(r.guard("streaming_cpu_8_vs_1_ranks",
                      lambda: local_ranks.streaming_cpu_8_vs_1_ranks(work, cold.server, "once")))
        # The stall only waits, and the steps overlapping it measure CPU seconds and peak RSS, which other load
        # on the machine does not change: they share its 30 s.
        stall = r.guard("stalled_client_rss_ratio", lambda: memory.stall_begin(cold.server, STALL_DATASETS))
        rss = Background(lambda: r.add(r.guard("streaming_rss_ratio", lambda: memory.streaming_rss_ratio(work))))
        feed = feeds.get("16x4096")
        if feed:
            r.add(r.guard("client_cpu_vs_inprocess", lambda: cached.client_cpu_vs_inprocess(work, feed)))
        rss.join()
        if stall:
            r.add(r.guard("stalled_client_rss_ratio", lambda: memory.stall_end(stall, 30.0, STALL_DATASETS)))
        tokens = work.path("tokens.npy")
        if feed:
            r.add(r.guard("vs_best_local", lambda: cached.vs_best_local(work, feed, tokens)))
        if feed and tokens.exists():
            r.add(r.guard("vs_mosaic_streaming", lambda: cached.vs_mosaic(work, feed, tokens, mosaic_venv)))
        r.add(r.guard("cache_build_vs_hf_single", lambda: build.cache_build_vs_hf_single(
            work, cold, epoch["wall_s"] if epoch else None, lambda i: write_config(
                work.path(f"rebuild-{i}.yaml"), work, work.sources, use_cache=True,
                cache_dir=str(work.path(f"cache-rebuild-{i}"))))))
    finally:
        cold.server.stop()
    r.add(r.guard("ray_build_vs_local", lambda: ray_build.ray_build_vs_local(work, work.sources)))
    # What a trainer's sidecar runs: the cached dataset alone (the main config's streaming datasets would make
    # every start load the tokenizer, which a warm cached start does not need).
    r.add(r.guard("fast_backend_exact", lambda: exact.fast_backend_exact(work)))
    warm = write_config(work.path("warm.yaml"), work, work.sources, use_cache=True, cache_dir=str(work.path("cache")))
    r.add(r.guard("warm_first_batch_s", lambda: startup.warm_first_batch(work, warm, work.root / "cache")))
    for metric in r.guard("cold_shard_cache_first_batch_s", lambda: shard_cache.measure(
            work, work.root / "cache", lambda name, keys: write_config(
                work.path(f"{name}.yaml"), work, work.sources, use_cache=True, **keys))) or []:
        r.add(metric)
    for metric in r.guard("bytes_fetched_per_sidecar_over_store", lambda: locality.measure(
            work, lambda name, sources, keys: write_config(work.path(f"{name}.yaml"), work, sources, use_cache=True,
                                                           **keys))) or []:
        r.add(metric)
    for metric in r.guard("bytes_fetched_per_sidecar_over_share", lambda: locality.measure_nodes(work.root)) or []:
        r.add(metric)
    for metric in r.guard("epoch_pad_repeat_fraction", epoch_waste.measure) or []:
        r.add(metric)
    for metric in r.guard("store_open_s", lambda: store_open.measure(
            rounds=2 if work.quick else 3, sidecars=0 if work.quick else 8)) or []:
        r.add(metric)
    for metric in r.guard("remote_", lambda: remote_sources.measure(
            megabytes=24 if work.quick else remote_sources.MB, rounds=2 if work.quick else 3)) or []:
        r.add(metric)
    for metric in r.guard("remote_identify_listing_vs_head", lambda: remote_identities.measure(
            objects=500 if work.quick else remote_identities.OBJECTS, rounds=2 if work.quick else 3)) or []:
        r.add(metric)
    for metric in r.guard("incremental_build_10pct_vs_full", lambda: incremental_build.measure(work)) or []:
        r.add(metric)
    for name, (unit, target) in TARGETS.items():
        r.metrics.setdefault(name, skipped(name, unit, target, "its step did not run"))
    r.log("done")
    return {name: r.metrics[name] for name in TARGETS}


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def table(metrics: dict[str, Metric]) -> str:
    """The results as a Markdown table."""
    lines = ["| metric | value | baseline | ratio | unit | target | met | mode |", "|---|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        met = {True: "yes", False: "NO", None: "-"}[m.met]
        lines.append(f"| {name} | {_fmt(m.value)} | {_fmt(m.baseline)} | {_fmt(m.ratio)} | {m.unit} | {m.target} "
                     f"| {met} | {m.mode} |")
    return "\n".join(lines)


def title(run: dict[str, Any]) -> str:
    """The plot's title: what ran, on what."""
    return (f"sigil-feed benchmarks{' (--quick)' if run.get('quick') else ''}: {run.get('cores')} cores, "
            f"{run.get('cpu')}, {run.get('corpus_bytes', 0) / 1e6:.0f} MB of Rust, deepseek tokenizer (129k vocab)")


def machine(work: Work) -> dict[str, Any]:
    """What the run ran on."""
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return {"quick": work.quick, "cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "corpus_bytes": sum(s.stat().st_size for s in work.sources),
            "command": "python -m bench" + (" --quick" if work.quick else "")}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a corpus subset; under five minutes on 2 cores")
    parser.add_argument("--corpus", help="folder with code.jsonl and pairs.jsonl (env SIGIL_FEED_CORPUS; "
                                         "default bench/corpus)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="where results.json and results.png go")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (logs, configs, stores)")
    parser.add_argument("--mosaic-venv", type=Path, default=mosaic.default_venv(),
                        help="venv with MosaicML Streaming (env SIGIL_FEED_MOSAIC_VENV; default bench/.venv-mosaic)")
    parser.add_argument("--setup-mosaic", action="store_true", help="create the MosaicML Streaming venv and exit")
    parser.add_argument("--plot-only", action="store_true", help="redraw results.png from results.json and exit")
    args = parser.parse_args()
    if args.setup_mosaic:
        mosaic.setup(args.mosaic_venv)
        return 0
    if args.plot_only:
        metrics, run = plot.load(args.out / "results.json")
        plot.draw(metrics, args.out / "results.png", title(run))
        print(table(metrics))
        return 0
    corpus = find_corpus(args.corpus)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sigil-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    work = Work(root.resolve(), corpus, args.quick)
    print(f"bench: work folder {work.root}", file=sys.stderr)
    try:
        metrics = run_all(work, args.mosaic_venv)
        run = machine(work)
    finally:
        if not args.keep_work and args.workdir is None:
            shutil.rmtree(work.root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {name: m.to_json() for name, m in metrics.items()}
    (args.out / "results.json").write_text(json.dumps({**results, "_run": run}, indent=2) + "\n")
    plot.draw(metrics, args.out / "results.png", title(run))
    print(table(metrics))
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
