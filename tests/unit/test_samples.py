"""Unit tests for record normalisation (data contract section 1)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sigil_feed.server.pipeline.samples import Sample, normalise
from sigil_feed.server.pipeline.sources.base import RawRecord


def raw(value: dict[str, Any] | None, error: str | None = None) -> RawRecord:
    """A raw record with id (2, 3, 4)."""
    return RawRecord(source=2, file=3, row=4, location="data.jsonl:5", value=value, error=error)


def test_pipeline_pair() -> None:
    value = {"prompt": "fn calculate_sum(values: &[i32]) -> i32 {", "gen": "    values.iter().sum()\n}\n",
             "_source": "synthetic", "_split": "train", "_task_type": "completion"}
    sample = normalise(raw(value))
    assert sample == Sample(2, 3, 4, text=value["prompt"] + "\n\n" + value["gen"], kind="pair", path=None,
                            masked=(0, len(value["prompt"]) + 2), task_type="completion", split="train")
    assert sample.id == (2, 3, 4)
    assert sample.text[:sample.masked[1]] == value["prompt"] + "\n\n"


def test_pair_metadata_is_optional_and_must_be_strings() -> None:
    sample = normalise(raw({"prompt": "p", "gen": "g", "_split": 1, "path": "a.rs"}))
    assert isinstance(sample, Sample)
    assert (sample.task_type, sample.split, sample.path) == (None, None, None)
    assert sample.masked == (0, 3)


def test_pair_custom_format() -> None:
    sample = normalise(raw({"prompt": "p", "gen": "g"}), lambda p, g: (f"<u>{p}</u>{g}", 8))
    assert isinstance(sample, Sample)
    assert (sample.text, sample.masked) == ("<u>p</u>g", (0, 8))


def test_plain_text() -> None:
    sample = normalise(raw({"text": "hello", "path": "doc/a.md", "_split": "val", "_task_type": "x"}))
    assert sample == Sample(2, 3, 4, text="hello", kind="text", path="doc/a.md", split="val")


def test_text_ignores_max_stars_repo_path() -> None:
    sample = normalise(raw({"text": "hello", "max_stars_repo_path": "src/a.rs"}))
    assert isinstance(sample, Sample)
    assert sample.path is None


def test_code_file() -> None:
    value = {"content": "fn main() {}", "path": "src/main.rs", "max_stars_repo_path": "other.rs"}
    sample = normalise(raw(value))
    assert sample == Sample(2, 3, 4, text="fn main() {}", kind="content", path="src/main.rs")


def test_code_file_falls_back_to_max_stars_repo_path() -> None:
    sample = normalise(raw({"content": "fn main() {}", "max_stars_repo_path": "src/lib.rs"}))
    assert isinstance(sample, Sample)
    assert (sample.kind, sample.path, sample.masked) == ("content", "src/lib.rs", ())


def test_non_string_path_is_dropped() -> None:
    sample = normalise(raw({"content": "x", "path": 7}))
    assert isinstance(sample, Sample)
    assert sample.path is None


@pytest.mark.parametrize(("value", "kind"), [
    ({"prompt": "p", "gen": "g", "text": "t", "content": "c"}, "pair"),
    ({"text": "t", "content": "c"}, "text"),
    ({"prompt": "p", "text": "t"}, "text"),  # a pair needs both prompt and gen
    ({"gen": "g", "content": "c"}, "content"),
    ({"text": None, "content": "c"}, "content"),  # null is missing, as a null Parquet or Arrow column is
    ({"prompt": "p", "gen": None, "text": "t"}, "text"),
])
def test_detection_order(value: dict[str, Any], kind: str) -> None:
    sample = normalise(raw(value))
    assert isinstance(sample, Sample)
    assert sample.kind == kind


@pytest.mark.parametrize("value", [{}, {"prompt": "p"}, {"gen": "g"}, {"body": "x", "path": "a.rs"},
                                   {"text": None}, {"prompt": "p", "gen": None}, {"content": None, "path": "a.rs"}])
def test_missing_fields(value: dict[str, Any]) -> None:
    assert normalise(raw(value)) == "missing_fields"


@pytest.mark.parametrize("value", [
    {"prompt": 1, "gen": "g"},
    {"prompt": ["p"], "gen": "g", "text": "t"},  # the pair is chosen, so its bad type counts
    {"text": 5},
    {"text": 0, "content": "c"},  # text is chosen first
    {"content": {"a": 1}},
    {"content": b"bytes"},
])
def test_bad_type(value: dict[str, Any]) -> None:
    assert normalise(raw(value)) == "bad_type"


@pytest.mark.parametrize(("error", "reason"), [("bad_utf8", "bad_utf8"), ("bad_json", "bad_json"),
                                               (None, "bad_json")])
def test_malformed_raw_record_passes_its_error_through(error: str | None, reason: str) -> None:
    assert normalise(raw(None, error)) == reason


LONE = "bad \ud800 text"  # what json.loads makes of an escaped lone surrogate: no UTF-8 encoding exists


@pytest.mark.parametrize("value", [
    {"text": LONE},
    {"content": LONE, "path": "src/lib.rs"},
    {"prompt": LONE, "gen": "g"},
    {"prompt": "p", "gen": "tail \udfff"},
    {"text": LONE, "content": "ok"},
    {"text": "ab\udcff"},  # invalid bytes decoded with surrogateescape (Arrow sources)
])
def test_lone_surrogates_are_bad_utf8_before_any_format(value: dict[str, Any]) -> None:
    formatted: list[tuple[str, str]] = []

    def chat(prompt: str, gen: str) -> tuple[str, int]:
        formatted.append((prompt, gen))
        return prompt + gen, len(prompt)

    assert normalise(raw(value), chat) == "bad_utf8"
    assert formatted == []  # the chat template never sees the string


@pytest.mark.parametrize("text", ["caf\u00e9", "\u4e2d\u6587", json.loads('"emoji \\ud83d\\ude00 (an escaped pair)"')])
def test_valid_non_ascii_text_is_kept(text: str) -> None:
    sample = normalise(raw({"text": text}))
    assert isinstance(sample, Sample) and sample.text == text
