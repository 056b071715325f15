"""fastokens against HF on every served sample of the corpus, through the server's own Encoder: the samples whose
ids differ, plain and split for completion_only (run as a subprocess)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CHUNK = 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    from bench.common import emit
    from bench.texts import curated_samples
    from sigil_feed.server.pipeline.tokenize import Encoder

    hf, fast = Encoder(args.tokenizer, backend="hf"), Encoder(args.tokenizer, backend="fastokens")
    assert (hf.backend_name, fast.backend_name) == ("hf", "fastokens")
    samples = list(curated_samples(args.files))
    t0 = time.perf_counter()
    mismatches = {"plain": 0, "completion_only": 0}
    tokens = 0
    for i in range(0, len(samples), CHUNK):
        chunk = samples[i:i + CHUNK]
        for mode, with_prompts in (("plain", False), ("completion_only", True)):
            a, b = hf.encode(chunk, with_prompts), fast.encode(chunk, with_prompts)
            tokens += len(a.ids)
            same = np.array_equal(a.ids, b.ids) and np.array_equal(a.offsets, b.offsets) and \
                np.array_equal(a.masked.bounds, b.masked.bounds)
            if not same:
                mismatches[mode] += sum(not np.array_equal(x.ids, y.ids) or not np.array_equal(x.masked, y.masked)
                                        for x, y in zip(a.samples(), b.samples(), strict=True))
    emit({"samples": len(samples), "tokens": tokens, "mismatches": mismatches,
          "mismatching": sum(mismatches.values()), "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
