"""The tokenizer's own speed on the served texts (run as a subprocess).

`--threads all`: the tokenizer's batched encoding on every core, texts already in memory: the limit streaming
mode is measured against, for `--backend hf` (HF `encode_batch_fast`) or `--backend fastokens`
(`encode_batch_flat`). `--threads 1`: one process, one thread, reading and curating the corpus and encoding it
with HF: what building a token store costs without sigil-feed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 1024


def encoder(backend: str, tokenizer_json: Path) -> Callable[[list[str]], int]:
    """A function encoding a batch of texts (no special tokens) into its token count, EOS per text included."""
    if backend == "fastokens":
        import fastokens

        fast = fastokens.Tokenizer.from_file(str(tokenizer_json))
        return lambda texts: len(fast.encode_batch_flat(texts)[0]) // 4 + len(texts)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer_json))
    return lambda texts: sum(len(e.ids) + 1 for e in hf.encode_batch_fast(texts, add_special_tokens=False))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--threads", choices=("all", "1"), default="all")
    parser.add_argument("--backend", choices=("hf", "fastokens"), default="hf")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    if args.threads == "1" and (os.environ.get("RAYON_NUM_THREADS") != "1" or args.backend != "hf"):
        sys.exit("run --threads 1 with --backend hf, RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false")

    from bench.common import emit
    from bench.texts import curated_texts

    encode = encoder(args.backend, Path(args.tokenizer) / "tokenizer.json")
    encode(["fn main() {}"] * 8)  # warm up the thread pool
    t0, cpu0 = time.perf_counter(), time.process_time()
    texts = list(curated_texts(args.files))
    read_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    tokens = sum(encode(texts[i:i + CHUNK]) for i in range(0, len(texts), CHUNK))
    encode_s = time.perf_counter() - t1
    emit({"samples": len(texts), "tokens": tokens, "chars": sum(map(len, texts)), "read_s": read_s,
          "encode_s": encode_s, "total_s": read_s + encode_s, "cpu_s": time.process_time() - cpu0,
          "tokens_per_s": tokens / encode_s, "threads": args.threads, "backend": args.backend})


if __name__ == "__main__":
    main()
