"""Unit tests for the record filters (data contract section 4)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sigil_feed.server.config import DatasetSection
from sigil_feed.server.pipeline import filters
from sigil_feed.server.pipeline.filters import FILTER_REASONS, FilterFn, make_filter

CODE = "fn main() {\n    let total = 1 + 2;\n}\n"


def pad(text: str, n: int = 100) -> str:
    """The text padded with spaces to exactly n characters."""
    assert len(text) <= n
    return text + " " * (n - len(text))


def make(legacy: bool = False, **settings: Any) -> FilterFn:
    """A filter for a dataset section with the given settings."""
    return make_filter(DatasetSection(names=["local:x"], legacy_filters=legacy, **settings))


def idiomatic(ratio: float) -> FilterFn:
    """A filter with prefer_idiomatic, the given ratio and no length floor worth mentioning."""
    return make(prefer_idiomatic=True, idiomatic_quality_ratio=ratio, min_length=1)


# The contract's test vectors: path, text, settings, reason by default, reason with legacy_filters.
VECTORS = [
    ("src/lib.rs", pad("fn f() {}\n#[cfg(test)]\nmod tests {}"), {}, "test_file", None),
    ("src/color.rs", pad('fn f() {\n    let c = "#fff";\n}'), {}, None, "test_file"),
    ("tests/it.rs", pad(CODE), {}, "test_file", None),
    ("crate/tests/it.rs", pad(CODE), {}, "test_file", "test_file"),
    ("crate/benches/b.rs", pad(CODE), {}, "bench_file", "bench_file"),
    ("crate/examples/e.rs", pad(CODE), {"exclude_examples": True}, "example_file", "example_file"),
    ("crate/target/debug/x.rs", pad(CODE), {}, "vendor_path", "vendor_path"),
    ("Cargo.lock", "anything", {}, "vendor_path", "vendor_path"),
    ("src/a.rs", pad(CODE, 63), {}, "too_short", "too_short"),
    ("src/a.rs", pad("pub fn f() {}"), {"prefer_idiomatic": True}, None, None),
    ("src/a.rs", pad('pub fn f() { println!("x"); }'),
     {"prefer_idiomatic": True, "idiomatic_quality_ratio": 2}, "not_idiomatic", "not_idiomatic"),
    ("src/a.rs", pad(CODE), {"prefer_documented": True}, "no_documentation", "no_documentation"),
]


@pytest.mark.parametrize("legacy", [False, True], ids=["default", "legacy"])
@pytest.mark.parametrize(("path", "text", "settings", "default", "legacy_reason"), VECTORS)
def test_contract_vectors(legacy: bool, path: str, text: str, settings: dict[str, Any],
                          default: str | None, legacy_reason: str | None) -> None:
    assert make(legacy, **settings)(path, text) == (legacy_reason if legacy else default)


def test_reasons_in_rule_order() -> None:
    assert FILTER_REASONS == ("vendor_path", "test_file", "example_file", "bench_file",
                              "too_short", "too_long", "not_idiomatic", "no_documentation")


@pytest.mark.parametrize("path", ["target/x.rs", "a/node_modules/b.js", "vendor/c/d.rs",
                                  "x/__pycache__/y.pyc", "crate/Cargo.lock", "Cargo.lock"])
def test_vendor_paths(path: str) -> None:
    assert make()(path, pad(CODE)) == "vendor_path"


@pytest.mark.parametrize("path", ["src/target.rs", "src/vendor", "targets/x.rs", "Cargo.toml", "src/tests",
                                  "tests.rs", "src/mytests/a.rs", "benches.rs", "crate/examples"])
def test_file_names_and_lookalike_directories_pass(path: str) -> None:
    assert make(exclude_examples=True)(path, pad(CODE)) is None


@pytest.mark.parametrize(("path", "reason"), [
    ("test/a.rs", "test_file"), ("a/b/tests/c/d.rs", "test_file"), ("/abs/tests/a.rs", "test_file"),
    ("example/a.rs", "example_file"), ("examples/a.rs", "example_file"),
    ("bench/a.rs", "bench_file"), ("benches/a.rs", "bench_file"),
])
def test_path_directories(path: str, reason: str) -> None:
    assert make(exclude_examples=True)(path, pad(CODE)) == reason


def test_legacy_path_patterns_need_a_leading_slash() -> None:
    legacy = make(legacy=True, exclude_examples=True)
    for path in ("target/x.rs", "tests/a.rs", "examples/a.rs", "benches/a.rs"):
        assert legacy(path, pad(CODE)) is None
    for path, reason in (("c/target/x.rs", "vendor_path"), ("c/test/a.rs", "test_file"),
                         ("c/example/a.rs", "example_file"), ("c/benches/a.rs", "bench_file")):
        assert legacy(path, pad(CODE)) == reason


def test_legacy_bench_pattern_is_benche_s() -> None:
    """`/benches?/` means "benche" plus an optional "s": a `bench` directory is not caught."""
    assert make(legacy=True)("c/bench/a.rs", pad(CODE)) is None
    assert make(legacy=True)("c/benche/a.rs", pad(CODE)) == "bench_file"
    assert make()("c/bench/a.rs", pad(CODE)) == "bench_file"


def test_bench_attribute_in_text() -> None:
    text = pad("#[cfg(bench)]\nmod b {}")
    assert make()("src/a.rs", text) == "bench_file"
    assert make(legacy=True)("src/a.rs", text) is None  # legacy looks at the path only


def test_legacy_character_class_bug() -> None:
    legacy = make(legacy=True)
    for text in ("#fff", "#(x)", "#e", "#c", "#s"):
        assert legacy("src/a.rs", pad(text)) == "test_file"
    assert legacy("src/a.rs", pad("#[cfg(test)] #[derive(Debug)] #!")) is None
    assert legacy("src/a.rs", pad("see /tests/ and /test/")) == "test_file"
    assert legacy("src/#fff/a.rs", pad(CODE)) == "test_file"  # the same pattern on the path
    assert make(legacy=True, exclude_tests=False)("src/#c/a.rs", pad(CODE)) == "bench_file"


def test_legacy_cargo_lock_dollar_allows_trailing_newline() -> None:
    assert make(legacy=True)("a/Cargo.lock\n", pad(CODE)) == "vendor_path"


def test_path_none_skips_path_rules() -> None:
    every = make(exclude_examples=True)
    assert every(None, pad(CODE)) is None
    assert every(None, pad("#[cfg(test)]")) == "test_file"
    assert every(None, pad("#[cfg(bench)]")) == "bench_file"
    assert make(legacy=True)(None, pad("#fff")) == "test_file"
    assert make(legacy=True)(None, pad(CODE)) is None


def test_disabled_rules_do_not_fire() -> None:
    none = make(exclude_tests=False, exclude_benches=False)
    assert none("crate/tests/a.rs", pad("#[cfg(test)]")) is None
    assert none("crate/benches/a.rs", pad("#[cfg(bench)]")) is None
    assert none("crate/examples/a.rs", pad(CODE)) is None  # exclude_examples is off by default
    assert none("crate/vendor/a.rs", pad(CODE)) == "vendor_path"  # always on


@pytest.mark.parametrize("legacy", [False, True])
def test_first_failing_rule_gives_the_reason(legacy: bool) -> None:
    every = make(legacy, exclude_examples=True, prefer_idiomatic=True, prefer_documented=True)
    assert every("c/vendor/tests/examples/benches/a.rs", "x") == "vendor_path"
    assert every("c/tests/examples/benches/a.rs", "x") == "test_file"
    assert every("c/examples/benches/a.rs", "x") == "example_file"
    assert every("c/benches/a.rs", "x") == "bench_file"
    assert every("src/a.rs", "x") == "too_short"
    assert every("src/a.rs", pad(CODE, 300_000)) == "too_long"
    assert every("src/a.rs", pad(CODE)) == "not_idiomatic"
    assert every("src/a.rs", pad("pub fn f() {}")) == "no_documentation"
    assert every("src/a.rs", pad("/// Doc.\npub fn f() {}")) is None


def test_length_boundaries() -> None:
    bounded = make(min_length=64, max_length=100)
    assert bounded("a.rs", "x" * 63) == "too_short"
    assert bounded("a.rs", "x" * 64) is None
    assert bounded("a.rs", "x" * 100) is None
    assert bounded("a.rs", "x" * 101) == "too_long"
    assert bounded("a.rs", "é" * 64) is None  # characters, not bytes


@pytest.mark.parametrize(("snippet", "kept"), [
    ("fn f() -> Result<u8, E> {", True),
    ("fn f() -> Result<u8, E>\n  {", True),
    ("fn f() -> Result<Vec<u8>, E> {", False),
    ("fn f() -> MyResult<u8, E> {", False),
    ("fn f() -> Option<u8> {", True),
    ("fn f() -> Option<Vec<u8>> {", False),
    ("let y = x.unwrap_or(0);", True),
    ("let y = f().unwrap_or(0);", False),
    ("let y = f().map(g);", True),
    ("let y = f().expect(\"e\");", True),
    ("let y = f().and_then(g);", True),
    ("#[derive(Debug)]\nstruct S;", True),
    ("#[derive()]\nstruct S;", False),
    ("impl Tr for X {}", True),
    ("impl<T> Tr for X {}", False),
    ("pub struct S;", True),
    ("pub mod m;", True),
    ("pub module_x;", False),
    ("pub(crate) fn f() {}", False),
])
def test_idiom_patterns(snippet: str, kept: bool) -> None:
    reason = idiomatic(2)("a.rs", snippet)
    assert reason == (None if kept else "not_idiomatic")


@pytest.mark.parametrize("marker", ["TODO", "todo", "ToDo", "FIXME", "fixme", "XXX", "xxx", "HACK", "Hack",
                                    "fİxme", "FıXME", "hac\u212a"])
def test_low_quality_markers_ignore_case(marker: str) -> None:
    assert idiomatic(2)("a.rs", f"pub fn f() {{}} // {marker}") == "not_idiomatic"  # 1 < 1 x 2
    assert idiomatic(2)("a.rs", "pub fn f() {} // done") is None


@pytest.mark.parametrize("snippet", ['println!("x");', "dbg! (x);", "unsafe { f() }", "#[allow(dead_code)]"])
def test_low_quality_patterns(snippet: str) -> None:
    text = f"pub fn f() {{}}\n{snippet}"
    assert idiomatic(2)("a.rs", text) == "not_idiomatic"
    assert idiomatic(1)("a.rs", text) is None


def test_quality_ratio() -> None:
    text = "pub fn f() {}\nimpl A for B {}\n// TODO"  # 2 idioms, 1 low-quality pattern
    assert idiomatic(2)("a.rs", text) is None
    assert idiomatic(2.5)("a.rs", text) == "not_idiomatic"
    twice = text + "\n// FIXME\n// todo"  # each pattern counts once
    assert idiomatic(2)("a.rs", twice) is None


@pytest.mark.parametrize(("snippet", "kept"), [
    ("/// Doc", True), ("//! Crate doc", True), ("/** Doc */", True),
    ("// plain", False), ("/* plain */", False),
])
def test_documentation_pattern(snippet: str, kept: bool) -> None:
    reason = make(prefer_documented=True, min_length=1)("a.rs", f"{snippet}\nfn f() {{}}")
    assert reason == (None if kept else "no_documentation")


# The contract's patterns, written out again: the filters' fast paths must agree with plain searches.
IDIOMS = [r"\bResult<[^>]+>\s*\{", r"\bOption<[^>]+>\s*\{",
          r"\b\.unwrap_or\(|\.expect\(|\.map\(|\.and_then\(", r"#\[derive\([^)]+\)\]",
          r"impl\s+\w+\s+for\s+\w+", r"pub\s+(fn|struct|enum|trait|mod)\s+"]
LOW_QUALITY = [r"(?i)TODO|FIXME|XXX|HACK", r"println!\s*\(|dbg!\s*\(", r"unsafe\s+\{", r"#\[allow\([^)]+\)\]"]
LEGACY_TEST = r"/tests?/|#[cfg\(test\)]"
FRAGMENTS = ["Result<", "Option<", "Vec<u8>", ">", " ", "\n", "{", "(", ")", "x", "f()", ".unwrap_or(",
             ".expect(", ".map(", ".and_then(", "#[derive(", "#[allow(", "Debug", ")]", "impl", "for", "<T>",
             "pub", "fn", "mod", "TODO", "fİxme", "FıXME", "hac\u212a", "xX", "println!", "dbg!", "unsafe",
             "#", "/test", "s/", "/", "cfg", "é"]


def counts(text: str) -> tuple[int, int]:
    """(idiom patterns, low-quality patterns) that occur, by the filters' own fast checks."""
    hits = [(is_idiom, occurs(text)) for is_idiom, occurs in filters._QUALITY_CHECKS]
    return sum(hit for is_idiom, hit in hits if is_idiom), sum(hit for is_idiom, hit in hits if not is_idiom)


@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))
def test_fast_paths_agree_with_the_contract_patterns(text: str) -> None:
    assert counts(text) == (sum(bool(re.search(p, text)) for p in IDIOMS),
                            sum(bool(re.search(p, text)) for p in LOW_QUALITY))
    assert make(legacy=True)(None, pad(text, 1000)) == ("test_file" if re.search(LEGACY_TEST, text) else None)


@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
       st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 7.0]))
def test_idiomatic_decision_stops_early_but_agrees_with_the_counts(text: str, ratio: float) -> None:
    idioms, low = counts(text)
    assert filters._idiomatic_enough(text, ratio) == (idioms >= 1 and idioms >= low * ratio)
