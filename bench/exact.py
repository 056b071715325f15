"""fast_backend_exact: samples whose ids differ between fastokens and HF over the whole (or --quick) corpus."""

from __future__ import annotations

from bench.common import Metric, Work, run_module


def fast_backend_exact(work: Work) -> Metric:
    """Every served sample encoded by both backends through the server's Encoder, plain and for completion_only."""
    out = run_module("bench.exact_worker", ["--tokenizer", str(work.tokenizer), *map(str, work.sources)],
                     log=work.path("logs", "exactness.log"), timeout=3600)
    return Metric("fast_backend_exact", out["mismatching"], None, "mismatching samples", "<= 0", mode="both",
                  notes=(f"{out['samples']} curated samples ({out['tokens'] / 1e6:.1f} M tokens over both modes), each "
                         f"encoded by HF and by fastokens, plain and split at the prompt (completion_only): "
                         f"{out['mismatches']}"), details=out)
