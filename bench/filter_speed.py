"""What the filters cost: records/s of reading alone vs reading + normalising + filtering, on the real corpus.

    python -m bench.filter_speed --corpus DIR [--repeats 3] [--json]

DIR is a folder made by ../shared/tools/make-rust-corpus; code.jsonl is read with JsonlSource. Measured,
best of --repeats runs each (the file is read once first, untimed, so every run finds it in the page cache):
- read: JsonlSource alone (decompress, split lines, json.loads);
- filter: normalise + the filter on records already in memory (the filters' own cost);
- read+filter: CuratedSource over JsonlSource, as the server runs it (with counting);
for the default settings and for the trainer's phase-2 settings (tests/fixtures/phase2.yaml).
For scale, the bundled tokenizer's rate (Encoder.encode, batched) on every --tokenize-every'th record.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from sigil_feed.server.config import DatasetSection
from sigil_feed.server.pipeline.accounting import SourceCounters
from sigil_feed.server.pipeline.curate import CuratedSource, CurateRules
from sigil_feed.server.pipeline.filters import make_filter
from sigil_feed.server.pipeline.samples import normalise, plain_pair
from sigil_feed.server.pipeline.sources.base import RawRecord
from sigil_feed.server.pipeline.sources.jsonl import JsonlSource
from sigil_feed.server.pipeline.tokenize import Encoder

REPO = Path(__file__).resolve().parent.parent
PHASE2 = REPO / "tests" / "fixtures" / "phase2.yaml"
TOKENIZER = REPO / "server" / "default" / "tokenizer"
FILTER_KEYS = ("min_length", "max_length", "exclude_tests", "exclude_examples", "exclude_benches",
               "prefer_idiomatic", "prefer_documented", "idiomatic_quality_ratio")


def settings() -> dict[str, DatasetSection]:
    """The filter settings measured: the defaults, and phase 2's (idiomatic and documented code)."""
    phase2 = yaml.safe_load(PHASE2.read_text())["dataset"]
    return {"default": DatasetSection(names=["local:x"]),
            "phase2": DatasetSection(names=["local:x"], **{k: phase2[k] for k in FILTER_KEYS if k in phase2})}


def best_of(repeats: int, run: Callable[[], int]) -> tuple[float, int]:
    """The fastest of `repeats` runs: (seconds, records the run counted)."""
    best, count = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        best = min(best, time.perf_counter() - start)
    return best, count


def read_only(path: Path) -> int:
    """Read every record of the file; the number read."""
    return sum(1 for _ in JsonlSource(f"local:{path}", 0, [str(path)]))


def filter_only(records: list[RawRecord], section: DatasetSection) -> int:
    """Normalise and filter records already in memory; the number kept."""
    keep = make_filter(section)
    kept = 0
    for record in records:
        sample = normalise(record)
        if not isinstance(sample, str) and keep(sample.path, sample.text) is None:
            kept += 1
    return kept


def read_and_filter(path: Path, section: DatasetSection) -> int:
    """CuratedSource over JsonlSource, as the server composes them; the number kept."""
    rules = CurateRules(filter=make_filter(section), filter_override=None, splits=frozenset(section.splits),
                        task_weights=None, seed=0, strict=False, pair_format=plain_pair)
    source = CuratedSource(JsonlSource(f"local:{path}", 0, [str(path)]), rules, SourceCounters(str(path)))
    return sum(1 for _ in source)


def tokenize_rate(records: list[RawRecord], every: int) -> dict[str, float]:
    """Records/s and tokens/s of the bundled tokenizer on every `every`th record (one run)."""
    samples = [s for s in map(normalise, records[::every]) if not isinstance(s, str)]
    encoder = Encoder(str(TOKENIZER))
    start = time.perf_counter()
    tokens = len(encoder.encode(samples, with_prompts=False).ids)
    seconds = time.perf_counter() - start
    return {"records": len(samples), "records_per_s": len(samples) / seconds, "tokens_per_s": tokens / seconds}


def measure(corpus: Path, repeats: int, tokenize_every: int) -> dict[str, Any]:
    """Every measurement, as a JSON-ready dict."""
    path = corpus / "code.jsonl"
    records = list(JsonlSource(f"local:{path}", 0, [str(path)]))  # also warms the page cache
    mb = path.stat().st_size / 1e6
    read_s, n = best_of(repeats, lambda: read_only(path))
    out: dict[str, Any] = {"file": str(path), "records": n, "mb": round(mb, 1),
                           "read": {"s": read_s, "records_per_s": n / read_s, "mb_per_s": mb / read_s}}
    for name, section in settings().items():
        filter_s, kept = best_of(repeats, partial(filter_only, records, section))
        both_s, kept_both = best_of(repeats, partial(read_and_filter, path, section))
        assert kept == kept_both, (name, kept, kept_both)
        out[name] = {"kept": kept, "filter_s": filter_s, "filter_records_per_s": n / filter_s,
                     "read_filter_s": both_s, "read_filter_records_per_s": n / both_s,
                     "filter_vs_read_speed": read_s / filter_s, "read_filter_vs_read_time": both_s / read_s}
    if tokenize_every:
        out["tokenize"] = tokenize_rate(records, tokenize_every)
    return out


def report(result: dict[str, Any]) -> str:
    """A few readable lines."""
    read = result["read"]
    lines = [f"{result['file']}: {result['records']} records, {result['mb']} MB",
             f"read alone           {read['records_per_s']:>10,.0f} records/s  ({read['mb_per_s']:.0f} MB/s)"]
    for name in settings():
        r = result[name]
        lines += [f"[{name}] kept {r['kept']}",
                  f"  filter alone       {r['filter_records_per_s']:>10,.0f} records/s  "
                  f"= {r['filter_vs_read_speed']:.1f}x the read rate",
                  f"  read + filter      {r['read_filter_records_per_s']:>10,.0f} records/s  "
                  f"= {r['read_filter_vs_read_time']:.2f}x the read time"]
    if "tokenize" in result:
        tok = result["tokenize"]
        lines.append(f"for scale: tokenize {tok['records_per_s']:>8,.0f} records/s  "
                     f"({tok['tokens_per_s']:,.0f} tokens/s, bundled tokenizer, {tok['records']} records)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the numbers."""
    parser = argparse.ArgumentParser(prog="python -m bench.filter_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="folder made by make-rust-corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenize-every", type=int, default=10, help="0: skip the tokenizer rate")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead")
    args = parser.parse_args(argv)
    result = measure(args.corpus, args.repeats, args.tokenize_every)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
