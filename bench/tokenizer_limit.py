"""The tokenizer's own speed on the served texts (run as a subprocess).

`--threads all`: the fast tokenizer's batched `encode_batch_fast` on every core, texts already in memory:
the limit streaming mode is measured against. `--threads 1`: one process, one thread, reading and curating
the corpus and encoding it: what building a token store costs without sigil-feed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

CHUNK = 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--threads", choices=("all", "1"), default="all")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    if args.threads == "1" and os.environ.get("RAYON_NUM_THREADS") != "1":
        sys.exit("run with RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false for --threads 1")
    from tokenizers import Tokenizer

    from bench.common import emit
    from bench.texts import curated_texts

    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
    tokenizer.encode_batch_fast(["fn main() {}"] * 8, add_special_tokens=False)  # warm up the thread pool
    t0, cpu0 = time.perf_counter(), time.process_time()
    texts = list(curated_texts(args.files))
    read_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), CHUNK):
        tokens += sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(texts[i:i + CHUNK],
                                                                          add_special_tokens=False))
    encode_s = time.perf_counter() - t1
    emit({"samples": len(texts), "tokens": tokens, "chars": sum(map(len, texts)), "read_s": read_s,
          "encode_s": encode_s, "total_s": read_s + encode_s, "cpu_s": time.process_time() - cpu0,
          "tokens_per_s": tokens / encode_s, "threads": args.threads})


if __name__ == "__main__":
    main()
