"""The new floor of streaming mode: only reading and parsing the sources, with the server's own JSONL reader (no
normalising, filters or tokenizer), as a subprocess."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    from bench.common import emit
    from sigil_feed.server.pipeline.sources.jsonl import JsonlSource

    t0, cpu0 = time.perf_counter(), time.process_time()
    records = sum(sum(1 for _ in JsonlSource(f"local:{f}", i, [str(f)])) for i, f in enumerate(args.files))
    emit({"records": records, "read_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0})


if __name__ == "__main__":
    main()
