"""bench/results.png: each metric against its target, and the tokens/s of every way to feed a trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import Metric

TICKS = (0.1, 0.3, 1, 3, 10)


def _headroom(metric: Metric) -> float | None:
    """How far past its target a metric is: > 1 met, < 1 missed (for both >= and <= targets)."""
    number = metric.ratio if metric.baseline is not None else metric.value
    if number is None or not metric.target:
        return None
    op, bound = metric.target.split()
    if not float(bound):
        return None  # an exact target (0 mismatches): the table says it
    if op == ">=":
        return number / float(bound)
    return float(bound) / number if number else float("inf")


def _rates(metrics: dict[str, Metric]) -> dict[str, float]:
    """tokens/s of sigil-feed and of each alternative, from the metrics' details."""
    rates: dict[str, float] = {}
    local, peer, stream, hf = metrics.get("vs_best_local"), metrics.get("vs_mosaic_streaming"), \
        metrics.get("streaming_vs_tokenizer_limit"), metrics.get("streaming_vs_hf_tokenizer")
    if local and local.value is not None and local.baseline is not None:
        rates[f"sigil-feed ({local.mode})"] = local.value
        rates["datasets map + DataLoader(2)"] = local.baseline
    if peer and peer.baseline is not None:
        rates["MosaicML Streaming (MDS)"] = peer.baseline
    if stream and stream.value is not None and stream.baseline is not None:
        rates["sigil-feed streaming epoch"] = stream.value
        backend = stream.details.get("tokenizer", {}).get("backend", "tokenizer")
        rates[f"{backend} alone (all cores)"] = stream.baseline
    if hf and hf.baseline is not None:
        rates["HF tokenizers alone (all cores)"] = hf.baseline
    return rates


def load(results: Path) -> tuple[dict[str, Metric], dict[str, Any]]:
    """Metrics and run facts back from a results.json."""
    raw = json.loads(results.read_text())
    run = raw.pop("_run", {})
    metrics = {name: Metric(name, m["value"], m["baseline"], m["unit"], m["target"], notes=m["notes"],
                            ratio=m["ratio"], mode=m["mode"], details=m["details"]) for name, m in raw.items()}
    return metrics, run


def draw(metrics: dict[str, Metric], out: Path, title: str) -> None:
    """Write the two-panel figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.1, 1]})
    rows = [(name, h, m) for name, m in metrics.items() if (h := _headroom(m)) is not None]
    names = [n for n, _, _ in rows]
    values = [min(h, 10.0) for _, h, _ in rows]
    colors = ["tab:green" if h >= 1 else "tab:red" for _, h, _ in rows]
    left.barh(names, values, color=colors)
    left.axvline(1.0, color="black", linestyle="--", linewidth=1)
    left.set_xscale("log")
    left.set_xlim(0.03, 60)
    left.set_xticks(TICKS, [f"{t:g}" for t in TICKS])
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("measured vs target (>1: met; capped at 10)")
    left.invert_yaxis()
    for i, (_, _, m) in enumerate(rows):
        shown = m.ratio if m.baseline is not None else m.value
        left.text(values[i], i, f" {shown:.3g} (target {m.target})", va="center", fontsize=8)
    left.set_title("each metric against its target")
    rates = _rates(metrics)
    if rates:
        right.barh(list(rates), [v / 1e6 for v in rates.values()], color="tab:blue")
        right.invert_yaxis()
        right.set_xscale("log")
        right.set_xlim(min(rates.values()) / 1e6 / 2, max(rates.values()) / 1e6 * 4)
        right.xaxis.set_minor_formatter(NullFormatter())
        right.set_xlabel("M tokens/s delivered (16x4096 packed; log scale)")
        for i, v in enumerate(rates.values()):
            right.text(v / 1e6, i, f" {v / 1e6:.2f}", va="center", fontsize=8)
    right.set_title("tokens/s, same run")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
