"""Cached-mode delivery: against the bare wire, the best local alternative, and MosaicML Streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import grpc_limit, mosaic
from bench.common import Metric, Work, alternate, best, run_module, skipped

SHAPES = ((16, 4096), (8, 2048))


def feed_rates(work: Work, target: str, shapes: list[str], dataset: str = "default") -> dict[str, dict[str, Any]]:
    """A FeedDataset client in its own process, for work.seconds per shape after a warm-up."""
    args = ["--target", target, "--dataset", dataset, "--seconds", str(work.seconds)]
    for shape in shapes:
        args += ["--shape", shape]
    result: dict[str, dict[str, Any]] = run_module("bench.feed_client", args,
                                                   log=work.path("logs", f"feed-{dataset}.log"))["shapes"]
    return result


def mode_note(mode: str) -> str:
    """What the measured side ran as."""
    if mode == "cached":
        return "sigil-feed in cached mode"
    return f"sigil-feed served in {mode or 'unknown'} mode (cached mode unavailable): the streaming equivalent"


def cached_vs_grpc_limit(work: Work, target: str) -> tuple[Metric, dict[str, dict[str, Any]]]:
    """Token-id bytes/s into torch tensors vs a bare grpc.aio stream of the same bytes per message, per shape."""
    names = [f"{b}x{s}" for b, s in SHAPES]
    feed_runs, bare_runs = alternate(work.reps, lambda: feed_rates(work, target, names),
                                     lambda: grpc_limit.measure({f"{b}x{s}": b * s * 4 for b, s in SHAPES},
                                                                work.seconds))
    feeds, shapes = {}, {}
    for name in names:
        feed = feeds[name] = best([run[name] for run in feed_runs], "bytes_per_s")
        bare = best([run[name] for run in bare_runs], "bytes_per_s")
        shapes[name] = {"bytes_per_s": feed["bytes_per_s"], "grpc_bytes_per_s": bare["bytes_per_s"],
                        "ratio": feed["bytes_per_s"] / bare["bytes_per_s"], "batches_per_s": feed["batches_per_s"],
                        "grpc_messages_per_s": bare["messages"] / bare["wall_s"], "runs": feed["runs"],
                        "grpc_runs": bare["runs"]}
    worst = min(shapes, key=lambda k: shapes[k]["ratio"])
    mode = feeds[worst]["mode"]
    text = "; ".join(f"{k}: {v['bytes_per_s'] / 1e6:.0f} vs {v['grpc_bytes_per_s'] / 1e6:.0f} MB/s "
                     f"({v['batches_per_s']:.0f} batches/s vs {v['grpc_messages_per_s']:.0f} msg/s)"
                     for k, v in shapes.items())
    text = f"best of {work.reps} alternating runs of each side; {text}"
    metric = Metric("cached_vs_grpc_limit", shapes[worst]["bytes_per_s"], shapes[worst]["grpc_bytes_per_s"],
                    "B/s", ">= 0.4", mode=mode,
                    notes=f"worst shape {worst} reported; {text}; int32 ids (vocab 129,280); {mode_note(mode)}",
                    details=shapes)
    return metric, feeds


def vs_best_local(work: Work, feed: dict[str, Any], tokens_out: Path) -> Metric:
    """tokens/s into the trainer: sigil-feed vs datasets map(num_proc=2) + DataLoader(num_workers=2)."""
    code, pairs = work.sources
    args = ["--tokenizer", str(work.tokenizer), "--code", str(code), "--pairs", str(pairs), "--seconds",
            str(work.seconds), "--reps", str(work.reps), "--save-tokens", str(tokens_out)]
    local = run_module("bench.local_best", args,
                       env={"HF_DATASETS_CACHE": str(work.path("hf-cache")), "HF_DATASETS_OFFLINE": "1"},
                       log=work.path("logs", "local_best.log"))
    return Metric("vs_best_local", feed["tokens_per_s"], local["tokens_per_s"], "tokens/s", ">= 1.0",
                  mode=feed["mode"],
                  notes=(f"16x4096 packed batches, best window of each side; baseline pre-tokenized "
                         f"{local['samples']} samples in {local['prep_s']:.1f} s with map(num_proc=2), reads its "
                         f"Arrow files in order (no shuffle); {mode_note(feed['mode'])}"),
                  details={"sigil": feed, "local": local})


def vs_mosaic(work: Work, feed: dict[str, Any], tokens: Path, venv: Path) -> Metric:
    """tokens/s into the trainer: sigil-feed vs MosaicML Streaming over local MDS shards, same shapes."""
    python = mosaic.venv_python(venv)
    if python is None:
        return skipped("vs_mosaic_streaming", "tokens/s", ">= 1.0",
                       f"no MosaicML Streaming venv at {venv}; create it with `python -m bench --setup-mosaic` "
                       f"(or set SIGIL_FEED_MOSAIC_VENV). {mosaic.WHY_OWN_VENV}")
    peer = mosaic.run(python, tokens, work.path("mds", "shards"), batch=16, seq=4096, seconds=work.seconds,
                      reps=work.reps, log=work.path("logs", "mosaic.log"))
    return Metric("vs_mosaic_streaming", feed["tokens_per_s"], peer["tokens_per_s"], "tokens/s", ">= 1.0",
                  mode=feed["mode"],
                  notes=(f"streaming-community {peer['version']} (MosaicML Streaming fork) in its own venv: MDS "
                         f"shards of 4096-token rows (llm-foundry concat layout, no position_ids/labels), "
                         f"StreamingDataset + DataLoader(num_workers=2), 16x4096; {mosaic.WHY_OWN_VENV}"),
                  details={"sigil": feed, "mosaic": peer})


def client_cpu_vs_inprocess(work: Work, feed: dict[str, Any]) -> Metric:
    """CPU seconds per million tokens in the training process: FeedDataset vs datasets iterable in-process."""
    code, pairs = work.sources
    base = run_module("bench.inprocess", ["--tokenizer", str(work.tokenizer), "--code", str(code),
                                          "--pairs", str(pairs), "--max-tokens", str(16 << 20)],
                      env={"HF_DATASETS_CACHE": str(work.path("hf-cache")), "HF_DATASETS_OFFLINE": "1"},
                      log=work.path("logs", "inprocess.log"))
    return Metric("client_cpu_vs_inprocess", feed["cpu_s_per_mtok"], base["cpu_s_per_mtok"], "CPU s / M tokens",
                  "<= 0.02", mode=feed["mode"],
                  notes=(f"process_time of the training process (all its threads): FeedDataset 16x4096 over "
                         f"{feed['tokens'] / 1e6:.1f} M tokens vs load_dataset(streaming=True) + filter + "
                         f"tokenizer(...) + packing over {base['tokens'] / 1e6:.1f} M tokens; "
                         f"{mode_note(feed['mode'])}"),
                  details={"sigil": feed, "inprocess": base})
