"""Normalise raw records of the three schemas (pipeline pair, plain text, code file) into samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .sources.base import RawRecord

PAIR_SEPARATOR = "\n\n"

ChatFormat = Callable[[str, str], tuple[str, int]]
"""(prompt, gen) -> (training text, characters of it that belong to the prompt)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """A training sample: text, optional prompt split, path, metadata, and its stable id."""

    source: int
    file: int
    row: int
    text: str
    kind: str  # "pair", "text" or "content"
    path: str | None = None
    prompt_chars: int = 0  # leading characters of text that belong to the prompt (and separator)
    task_type: str | None = None
    split: str | None = None

    @property
    def id(self) -> tuple[int, int, int]:
        """The stable sample id: (source index, file index, row)."""
        return (self.source, self.file, self.row)


def plain_pair(prompt: str, gen: str) -> tuple[str, int]:
    """The finetuner's default pair format: prompt, a blank line, the generation."""
    return prompt + PAIR_SEPARATOR + gen, len(prompt) + len(PAIR_SEPARATOR)


def _meta(value: dict[str, Any], key: str) -> str | None:
    item = value.get(key)
    return item if isinstance(item, str) else None


def _text_error(item: object) -> str | None:
    """Why a value cannot be training text: not a string (bad_type), or not encodable as UTF-8 (bad_utf8:
    a lone surrogate, as JSON's escaped "\\ud800" or undecodable Arrow bytes give), else None."""
    if not isinstance(item, str):
        return "bad_type"
    if item.isascii():
        return None
    try:
        item.encode()
    except UnicodeEncodeError:
        return "bad_utf8"
    return None


def normalise(record: RawRecord, pair_format: ChatFormat = plain_pair) -> Sample | str:
    """Turn a raw record into a Sample, or return the malformed reason (missing_fields, bad_type, bad_utf8, ...).

    A null field counts as missing, as a null column in Parquet or Arrow does. Every string that reaches the
    tokenizer (prompt and gen before any chat template, text, content) is checked here.
    """
    value = record.value
    if value is None:
        return record.error or "bad_json"
    ids = (record.source, record.file, record.row)
    if value.get("prompt") is not None and value.get("gen") is not None:
        prompt, gen = value["prompt"], value["gen"]
        error = _text_error(prompt) or _text_error(gen)
        if error:
            return error
        text, prompt_chars = pair_format(prompt, gen)
        return Sample(*ids, text=text, kind="pair", prompt_chars=prompt_chars,
                      task_type=_meta(value, "_task_type"), split=_meta(value, "_split"))
    for field, kind in (("text", "text"), ("content", "content")):
        body = value.get(field)
        if body is not None:
            error = _text_error(body)
            if error:
                return error
            path = value.get("path")
            if path is None and kind == "content":
                path = value.get("max_stars_repo_path")
            return Sample(*ids, text=body, kind=kind, path=path if isinstance(path, str) else None,
                          split=_meta(value, "_split"))
    return "missing_fields"
