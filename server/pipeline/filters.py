"""The finetuner's record filters (data contract section 4): path, test/bench, length and quality rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from ..config import DatasetSection

FILTER_REASONS: tuple[str, ...] = (
    "vendor_path", "test_file", "example_file", "bench_file",
    "too_short", "too_long", "not_idiomatic", "no_documentation",
)

FilterFn = Callable[[str | None, str], str | None]
"""(path or None, text) -> the reason the record is dropped, or None when it is kept."""


def _dir_pattern(*names: str) -> re.Pattern[str]:
    """A pattern for a path directory (a `/`-separated component but the last) named one of names."""
    return re.compile(rf"(?:^|/)(?:{'|'.join(map(re.escape, names))})/")


_VENDOR_DIR = _dir_pattern("target", "node_modules", "vendor", "__pycache__")
_TEST_DIR = _dir_pattern("test", "tests")
_EXAMPLE_DIR = _dir_pattern("example", "examples")
_BENCH_DIR = _dir_pattern("bench", "benches")

# The finetuner's patterns, bugs included (legacy_filters: true).
_LEGACY_VENDOR = re.compile(r"/(target|node_modules|vendor|__pycache__)/")
_LEGACY_CARGO_LOCK = re.compile(r"Cargo\.lock$")
_LEGACY_TEST = re.compile(r"/tests?/|#[cfg\(test\)]")
_LEGACY_TEST_ANCHORS = ("/test", "#")  # every match starts with one of these (see _occurs)
_LEGACY_EXAMPLE = re.compile(r"/examples?/")
_LEGACY_BENCH = re.compile(r"/benches?/|#[cfg\(bench\)]")

# The trainer's quality patterns, unchanged. Each is paired with its anchors: every match starts with one of
# them, so the pattern occurs iff it matches at some anchor occurrence (str.find is far faster than search).
_Anchored = tuple[tuple[str, ...], re.Pattern[str]]
_IDIOMS: tuple[_Anchored, ...] = (
    (("Result<",), re.compile(r"\bResult<[^>]+>\s*\{")),
    (("Option<",), re.compile(r"\bOption<[^>]+>\s*\{")),
    ((".map(", ".expect(", ".unwrap_or(", ".and_then("),  # any one decides; the commonest is tried first
     re.compile(r"\b\.unwrap_or\(|\.expect\(|\.map\(|\.and_then\(")),
    (("#[derive(",), re.compile(r"#\[derive\([^)]+\)\]")),
    (("impl",), re.compile(r"impl\s+\w+\s+for\s+\w+")),
    (("pub",), re.compile(r"pub\s+(fn|struct|enum|trait|mod)\s+")),
)
_MARKERS = re.compile(r"TODO|FIXME|XXX|HACK", re.IGNORECASE)
_MARKERS_LOWER = ("todo", "fixme", "xxx", "hack")
_DOTTED_I = ("\u0130", "\u0131")  # the only characters _MARKERS folds that str.lower() does not map alike
_LOW_QUALITY: tuple[_Anchored, ...] = (
    (("println!", "dbg!"), re.compile(r"println!\s*\(|dbg!\s*\(")),
    (("unsafe",), re.compile(r"unsafe\s+\{")),
    (("#[allow(",), re.compile(r"#\[allow\([^)]+\)\]")),
)
_DOCUMENTATION = re.compile(r"///|//!|/\*\*")


def _occurs(anchors: tuple[str, ...], pattern: re.Pattern[str], text: str) -> bool:
    """Whether pattern matches in text, trying it only where one of its anchors occurs."""
    for anchor in anchors:
        i = text.find(anchor)
        while i >= 0:
            if pattern.match(text, i):
                return True
            i = text.find(anchor, i + 1)
    return False


def _has_marker(text: str) -> bool:
    """Whether the case-insensitive TODO|FIXME|XXX|HACK pattern occurs (lower-casing is much faster)."""
    if any(c in text for c in _DOTTED_I):
        return _MARKERS.search(text) is not None
    lower = text.lower()
    return any(m in lower for m in _MARKERS_LOWER)


def _checks() -> tuple[tuple[bool, Callable[[str], bool]], ...]:
    """Every quality pattern as (is an idiom, occurs in text): idioms, then low-quality ones, the marker check
    (which lower-cases the text) last."""
    occurs = [(anchors, pattern) for anchors, pattern in _IDIOMS + _LOW_QUALITY]
    return (*((i < len(_IDIOMS), partial(_occurs, *p)) for i, p in enumerate(occurs)), (False, _has_marker))


_QUALITY_CHECKS = _checks()


def _idiomatic_enough(text: str, ratio: float) -> bool:
    """idioms >= 1 and idioms >= ratio * low-quality patterns, evaluating the patterns in _QUALITY_CHECKS order only
    until the answer is certain (on real Rust, two files in three never reach the costly marker check)."""
    idioms, idioms_left, low, low_left = 0, len(_IDIOMS), 0, len(_LOW_QUALITY) + 1
    for is_idiom, occurs in _QUALITY_CHECKS:
        if idioms >= 1 and idioms >= ratio * (low + low_left):
            return True
        if idioms + idioms_left < 1 or idioms + idioms_left < ratio * low:
            return False
        hit = occurs(text)
        if is_idiom:
            idioms, idioms_left = idioms + hit, idioms_left - 1
        else:
            low, low_left = low + hit, low_left - 1
    return idioms >= 1 and idioms >= ratio * low


def _vendor(path: str | None, text: str) -> str | None:
    """vendor_path: a vendored/build directory, or a Cargo.lock."""
    if path is not None and (path.endswith("Cargo.lock") or _VENDOR_DIR.search(path)):
        return "vendor_path"
    return None


def _test(path: str | None, text: str) -> str | None:
    """test_file: a test/tests directory, or `#[cfg(test)]` in the text."""
    if "#[cfg(test)]" in text or (path is not None and _TEST_DIR.search(path)):
        return "test_file"
    return None


def _example(path: str | None, text: str) -> str | None:
    """example_file: an example/examples directory."""
    return "example_file" if path is not None and _EXAMPLE_DIR.search(path) else None


def _bench(path: str | None, text: str) -> str | None:
    """bench_file: a bench/benches directory, or `#[cfg(bench)]` in the text."""
    if "#[cfg(bench)]" in text or (path is not None and _BENCH_DIR.search(path)):
        return "bench_file"
    return None


def _legacy_vendor(path: str | None, text: str) -> str | None:
    """vendor_path as the finetuner tested it."""
    if path is not None and (_LEGACY_VENDOR.search(path) or _LEGACY_CARGO_LOCK.search(path)):
        return "vendor_path"
    return None


def _legacy_test(path: str | None, text: str) -> str | None:
    """test_file as the finetuner tested it (character-class bug included)."""
    if (path is not None and _LEGACY_TEST.search(path)) or _occurs(_LEGACY_TEST_ANCHORS, _LEGACY_TEST, text):
        return "test_file"
    return None


def _legacy_example(path: str | None, text: str) -> str | None:
    """example_file as the finetuner tested it."""
    return "example_file" if path is not None and _LEGACY_EXAMPLE.search(path) else None


def _legacy_bench(path: str | None, text: str) -> str | None:
    """bench_file as the finetuner tested it: the path only."""
    return "bench_file" if path is not None and _LEGACY_BENCH.search(path) else None


def _documented(path: str | None, text: str) -> str | None:
    """no_documentation: no doc comment in the text."""
    return None if _DOCUMENTATION.search(text) else "no_documentation"


def make_filter(section: DatasetSection) -> FilterFn:
    """Build the filter for a dataset section: the first failing rule, in contract order, gives the reason."""
    legacy = section.legacy_filters
    rules: list[FilterFn] = [_legacy_vendor if legacy else _vendor]
    if section.exclude_tests:
        rules.append(_legacy_test if legacy else _test)
    if section.exclude_examples:
        rules.append(_legacy_example if legacy else _example)
    if section.exclude_benches:
        rules.append(_legacy_bench if legacy else _bench)
    lo, hi, ratio = section.min_length, section.max_length, section.idiomatic_quality_ratio

    def length(path: str | None, text: str) -> str | None:
        """too_short / too_long: the text's length outside [min_length, max_length]."""
        n = len(text)
        return "too_short" if n < lo else "too_long" if n > hi else None

    def idiomatic(path: str | None, text: str) -> str | None:
        """not_idiomatic: no idiom, or fewer than ratio times the low-quality patterns."""
        return None if _idiomatic_enough(text, ratio) else "not_idiomatic"

    rules.append(length)
    if section.prefer_idiomatic:
        rules.append(idiomatic)
    if section.prefer_documented:
        rules.append(_documented)
    chain = tuple(rules)

    def apply(path: str | None, text: str) -> str | None:
        """The reason the record is dropped, or None when it is kept."""
        for rule in chain:
            reason = rule(path, text)
            if reason is not None:
                return reason
        return None

    return apply
