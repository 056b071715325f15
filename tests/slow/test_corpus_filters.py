"""The trainer's phase-1 and phase-2 settings on the real Rust corpus, against the contract's rules written out plainly.

`contract_reason` below is an independent, deliberately naive reading of data contract sections 1 and 4:
every pattern is the contract's own, searched with `re.search` over the whole text, path directories
are found by splitting on `/`; none of sigil-feed's fast paths. sigil-feed's decisions (read through a
real server for phase 1, from `ServedDataset.mix()` in-process for phase 2 and the filter-mode
comparison) must equal it record for record, and its counters must account for every record read.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoTokenizer

from sigil_feed.client import FeedDataset
from sigil_feed.server.config import parse_config
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.runtime import Runtime
from tests.conftest import TOKENIZER_DIR

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# --- the contract, read plainly -----------------------------------------------------------------

IDIOMS = [r"\bResult<[^>]+>\s*\{", r"\bOption<[^>]+>\s*\{", r"\b\.unwrap_or\(|\.expect\(|\.map\(|\.and_then\(",
          r"#\[derive\([^)]+\)\]", r"impl\s+\w+\s+for\s+\w+", r"pub\s+(fn|struct|enum|trait|mod)\s+"]
LOW_QUALITY = [(r"TODO|FIXME|XXX|HACK", re.IGNORECASE), (r"println!\s*\(|dbg!\s*\(", 0), (r"unsafe\s+\{", 0),
               (r"#\[allow\([^)]+\)\]", 0)]
DOCUMENTATION = r"///|//!|/\*\*"
LEGACY_VENDOR, LEGACY_CARGO_LOCK = r"/(target|node_modules|vendor|__pycache__)/", r"Cargo\.lock$"
LEGACY_TEST, LEGACY_EXAMPLE, LEGACY_BENCH = r"/tests?/|#[cfg\(test\)]", r"/examples?/", r"/benches?/|#[cfg\(bench\)]"
MALFORMED = ("bad_json", "bad_utf8", "bad_type", "missing_fields")


@dataclass(frozen=True)
class Rules:
    """A `dataset:` section's filter settings, with the contract's defaults."""

    min_length: int = 64
    max_length: int = 200_000
    exclude_tests: bool = True
    exclude_examples: bool = False
    exclude_benches: bool = True
    prefer_idiomatic: bool = False
    prefer_documented: bool = False
    idiomatic_quality_ratio: float = 2.0
    legacy_filters: bool = False
    splits: tuple[str, ...] = ("train",)

    @classmethod
    def of(cls, section: dict[str, Any]) -> Rules:
        """The settings a trainer `dataset:` section holds."""
        known = {k: v for k, v in section.items() if k in cls.__dataclass_fields__}
        if "splits" in known:
            known["splits"] = tuple(known["splits"])
        return cls(**known)


@dataclass(frozen=True)
class Record:
    """A record as the contract's schema table reads it, or its malformed reason."""

    row: int
    kind: str  # "pair", "text", "content" or a malformed reason
    text: str = ""
    path: str | None = None
    split: str | None = None


def schema(row: int, value: Any) -> Record:
    """Detect the schema in the contract's order: pair, then text, then content."""
    if not isinstance(value, dict):
        return Record(row, "bad_type")
    value = {k: v for k, v in value.items() if v is not None}  # a Parquet null is a missing field
    split = value.get("_split") if isinstance(value.get("_split"), str) else None
    if "prompt" in value and "gen" in value:
        if not (isinstance(value["prompt"], str) and isinstance(value["gen"], str)):
            return Record(row, "bad_type")
        return Record(row, "pair", value["prompt"] + "\n\n" + value["gen"], None, split)
    for field in ("text", "content"):
        if field in value:
            if not isinstance(value[field], str):
                return Record(row, "bad_type")
            path = value.get("path")
            if path is None and field == "content":
                path = value.get("max_stars_repo_path")
            return Record(row, field, value[field], path if isinstance(path, str) else None, split)
    return Record(row, "missing_fields")


def directories(path: str) -> list[str]:
    """The components of a path but the last, split on `/`."""
    return path.split("/")[:-1]


def filter_reason(path: str | None, text: str, rules: Rules) -> str | None:
    """Contract section 4, in its order: the first rule that fails, or None."""
    p = path or ""
    has = path is not None
    if rules.legacy_filters:
        vendor = has and (re.search(LEGACY_VENDOR, p) is not None or re.search(LEGACY_CARGO_LOCK, p) is not None)
        test = (has and re.search(LEGACY_TEST, p) is not None) or re.search(LEGACY_TEST, text) is not None
        example = has and re.search(LEGACY_EXAMPLE, p) is not None
        bench = has and re.search(LEGACY_BENCH, p) is not None
    else:
        dirs = directories(p) if has else []
        vendor = has and (any(d in ("target", "node_modules", "vendor", "__pycache__") for d in dirs)
                          or p.endswith("Cargo.lock"))
        test = any(d in ("test", "tests") for d in dirs) or "#[cfg(test)]" in text
        example = any(d in ("example", "examples") for d in dirs)
        bench = any(d in ("bench", "benches") for d in dirs) or "#[cfg(bench)]" in text
    if vendor:
        return "vendor_path"
    if rules.exclude_tests and test:
        return "test_file"
    if rules.exclude_examples and example:
        return "example_file"
    if rules.exclude_benches and bench:
        return "bench_file"
    if len(text) < rules.min_length:
        return "too_short"
    if len(text) > rules.max_length:
        return "too_long"
    if rules.prefer_idiomatic:
        idioms = sum(re.search(pattern, text) is not None for pattern in IDIOMS)
        low = sum(re.search(pattern, text, flags) is not None for pattern, flags in LOW_QUALITY)
        if not (idioms >= 1 and idioms >= low * rules.idiomatic_quality_ratio):
            return "not_idiomatic"
    if rules.prefer_documented and re.search(DOCUMENTATION, text) is None:
        return "no_documentation"
    return None


def contract_reason(record: Record, rules: Rules, filtered: bool | None = None) -> str | None:
    """What the contract does with a record: malformed reason, other_split, a filter reason, or None (kept)."""
    if record.kind in MALFORMED:
        return record.kind
    if (record.split or "train") not in rules.splits:
        return "other_split"
    if filtered is None:
        filtered = record.kind != "pair"  # pipeline pairs pass unfiltered by default
    return filter_reason(record.path, record.text, rules) if filtered else None


# --- reading the corpus plainly ----------------------------------------------------------------


@cache
def records(path: Path) -> tuple[Record, ...]:
    """Every record of a corpus file: JSONL lines (blank ones skipped) or Parquet rows."""
    if path.suffix == ".parquet":
        return tuple(schema(row, value) for row, value in enumerate(pq.read_table(path).to_pylist()))
    out = []
    with path.open("rb") as lines:
        for row, line in enumerate(lines):
            if line.isspace():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(Record(row, "bad_utf8"))
                continue
            except ValueError:
                out.append(Record(row, "bad_json"))
                continue
            out.append(schema(row, value))
    return tuple(out)


def reasons(path: Path, rules: Rules) -> dict[int, str | None]:
    """Row -> the contract's decision, for every record of a file."""
    return {r.row: contract_reason(r, rules) for r in records(path)}


def expected_counts(decisions: dict[int, str | None]) -> dict[str, Any]:
    """A source's expected counters from the decision on each record."""
    counts = Counter(r for r in decisions.values() if r is not None)
    return {"read": len(decisions), "kept": sum(r is None for r in decisions.values()),
            "dropped": {r: n for r, n in counts.items() if r not in MALFORMED},
            "malformed": {r: n for r, n in counts.items() if r in MALFORMED}}


# --- sigil-feed ------------------------------------------------------------------------------


def trainer_config(fixture: str, names: dict[str, str], **dataset: Any) -> dict[str, Any]:
    """A trainer config file from tests/fixtures with its sources replaced (old spec -> new spec)."""
    raw = yaml.safe_load((FIXTURES / fixture).read_text())
    section = raw["dataset"]
    assert set(section["names"]) == set(names), "the map must replace every source of the fixture"
    section["names"] = [names[n] for n in section["names"]]
    if section.get("dataset_weights"):
        section["dataset_weights"] = {names[k]: v for k, v in section["dataset_weights"].items()}
    section.update(dataset)
    raw["model_name"] = str(TOKENIZER_DIR)
    return raw


def served_dataset(raw: dict[str, Any], folder: Path, runtime: Runtime) -> ServedDataset:
    """The `default` dataset of a config, opened in-process as the server opens it."""
    config = parse_config(raw, str(folder / "trainer.yaml"), folder)
    return ServedDataset(config.datasets["default"], config.file, runtime=runtime)


def counters(dataset: ServedDataset) -> list[dict[str, Any]]:
    """Each source's counters, in the form of `expected_counts`."""
    return [{k: v for k, v in c.snapshot().items() if k in ("read", "kept", "dropped", "malformed")}
            for c in dataset.counters]


def check_accounting(sources: list[dict[str, Any]]) -> None:
    """read = kept + dropped + malformed, for every source."""
    for s in sources:
        assert int(s["read"]) == int(s["kept"]) + sum(map(int, s["dropped"].values())) + sum(
            map(int, s["malformed"].values())), s


def describe_difference(got: Counter[Any], want: Counter[Any], show: Callable[[Any], str] = repr) -> str:
    """A short account of how two multisets differ."""
    extra, missing = got - want, want - got
    return (f"{sum(extra.values())} unexpected, {sum(missing.values())} missing; "
            f"e.g. unexpected {[show(k) for k in list(extra)[:3]]}, missing {[show(k) for k in list(missing)[:3]]}")


# --- the tests ---------------------------------------------------------------------------------


def test_phase1_through_a_real_server_serves_exactly_the_contracts_kept_files(
        corpus: Path, tmp_path: Path, start_server: Callable[..., Any]) -> None:
    code = corpus / "code.jsonl"
    raw = trainer_config("phase1.yaml", {"ammarnasr/the-stack-rust-clean": f"local:{code}"},
                         use_cache=False, epochs=1, remainder="keep")
    config = tmp_path / "phase1.yaml"
    config.write_text(yaml.safe_dump(raw))
    decisions = reasons(code, Rules.of(raw["dataset"]))
    by_row = {r.row: r for r in records(code)}
    want = Counter(by_row[row].text for row, reason in decisions.items() if reason is None)

    server = start_server(config)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    eos = tokenizer.eos_token_id
    chunks = [batch["input_ids"].reshape(-1).numpy() for batch in FeedDataset(server.target, batch_size=4)]
    ids = np.concatenate(chunks)
    pieces = [p[:-1] for p in np.split(ids, np.flatnonzero(ids == eos) + 1) if len(p) > 1]  # padding is EOS too
    got = Counter(tokenizer.batch_decode([p.tolist() for p in pieces]))
    assert got == want, describe_difference(got, want, lambda t: t[:80])

    out = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "stats", "--target", server.target,
                          "--json"], capture_output=True, text=True, timeout=60, check=True)
    (source,) = json.loads(out.stdout)["datasets"][0]["sources"]
    check_accounting([source])
    stats = {"read": int(source["read"]), "kept": int(source["kept"]),
             "dropped": {k: int(v) for k, v in source["dropped"].items()},
             "malformed": {k: int(v) for k, v in source["malformed"].items()}}
    assert stats == expected_counts(decisions)
    assert stats["read"] == len(records(code))


def phase2_sources(corpus: Path) -> dict[str, str]:
    """Phase 2's three sources replaced with the corpus: code files (JSONL), pairs, code files (Parquet)."""
    return {"ammarnasr/the-stack-rust-clean": f"local:{corpus / 'code.jsonl'}",
            "local:./data/synthetic.jsonl": f"local:{corpus / 'pairs.jsonl'}",
            "parquet:./data/output.parquet": f"parquet:{corpus / 'code.parquet'}"}


def test_phase2_keeps_exactly_the_contracts_records_of_every_source(corpus: Path, tmp_path: Path,
                                                                    runtime: Runtime) -> None:
    # sequential, so that every record of every source is read; the configured weighted mix stops at the
    # first exhausted source (checked in the next test)
    raw = trainer_config("phase2.yaml", phase2_sources(corpus), use_cache=False, interleave_mode="sequential")
    dataset = served_dataset(raw, tmp_path, runtime)
    rules = Rules.of(raw["dataset"])
    assert rules.prefer_idiomatic and rules.prefer_documented
    got = Counter(sample.id for sample in dataset.mix())
    files = [corpus / "code.jsonl", corpus / "pairs.jsonl", corpus / "code.parquet"]
    decisions = [reasons(path, rules) for path in files]
    # task_weights name completion (1.0) and docstring (1.5); the corpus has completion and doc_to_code,
    # so every kept sample appears exactly once
    want = Counter((source, 0, row) for source, d in enumerate(decisions) for row, reason in d.items()
                   if reason is None)
    assert got == want, describe_difference(got, want)
    assert counters(dataset) == [expected_counts(d) for d in decisions]
    check_accounting(counters(dataset))
    assert all(counts["kept"] for counts in counters(dataset))
    assert expected_counts(decisions[1])["dropped"].get("other_split")  # the corpus's val pairs


def test_phase2_weighted_mix_keeps_exactly_the_contracts_records_of_what_it_read(corpus: Path, tmp_path: Path,
                                                                                 runtime: Runtime) -> None:
    raw = trainer_config("phase2.yaml", phase2_sources(corpus), use_cache=False)
    assert raw["dataset"]["interleave_mode"] == "weighted"
    dataset = served_dataset(raw, tmp_path, runtime)
    rules = Rules.of(raw["dataset"])
    got = Counter(sample.id for sample in dataset.mix())
    files = [corpus / "code.jsonl", corpus / "pairs.jsonl", corpus / "code.parquet"]
    for source, (path, counts) in enumerate(zip(files, counters(dataset), strict=True)):
        seen = records(path)[:counts["read"]]  # a source is read in order from its start, once
        decisions = {r.row: contract_reason(r, rules) for r in seen}
        want = Counter((source, 0, row) for row, reason in decisions.items() if reason is None)
        assert Counter({k: n for k, n in got.items() if k[0] == source}) == want, source
        assert counts == expected_counts(decisions)
    assert counters(dataset)[0]["read"] == len(records(files[0]))  # first_exhausted: code.jsonl ran out


def test_default_and_legacy_filters_on_the_code_files(corpus: Path, tmp_path: Path, runtime: Runtime,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = corpus / "code.jsonl"
    results = {}
    for legacy in (False, True):
        raw = trainer_config("phase1.yaml", {"ammarnasr/the-stack-rust-clean": f"local:{code}"},
                             use_cache=False, legacy_filters=legacy)
        dataset = served_dataset(raw, tmp_path, runtime)
        decisions = reasons(code, Rules.of(raw["dataset"]))
        kept = {sample.row for sample in dataset.mix()}
        assert kept == {row for row, reason in decisions.items() if reason is None}
        (counts,) = counters(dataset)
        assert counts == expected_counts(decisions)
        check_accounting([counts])
        results[legacy] = counts
    texts = [r for r in records(code) if r.kind == "content"]
    cfg_test = sum("#[cfg(test)]" in r.text for r in texts)
    legacy_text = sum(re.search(LEGACY_TEST, r.text) is not None for r in texts)
    legacy_any = sum(re.search(LEGACY_TEST, r.text) is not None or re.search(LEGACY_TEST, r.path or "") is not None
                     for r in texts)
    test_dirs = sum(any(d in ("test", "tests") for d in directories(r.path or "")) for r in texts)
    default_drop, legacy_drop = results[False]["dropped"], results[True]["dropped"]
    with capsys.disabled():
        print(f"\ncode.jsonl: {len(texts)} files; {cfg_test} contain #[cfg(test)], {test_dirs} lie in a test(s) "
              f"directory; the legacy test pattern matches the text of {legacy_text} and text or path of "
              f"{legacy_any}")
        print(f"test_file drops: default {default_drop.get('test_file', 0)}, legacy {legacy_drop.get('test_file', 0)}; "
              f"kept: default {results[False]['kept']}, legacy {results[True]['kept']}")
        print(f"dropped by reason: default {dict(sorted(default_drop.items()))}; "
              f"legacy {dict(sorted(legacy_drop.items()))}")
    assert cfg_test != legacy_text and results[False]["kept"] != results[True]["kept"]
