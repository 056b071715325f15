"""Normalise raw records of the four schemas (pipeline pair, chat messages, plain text, code file) into samples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .chat import MessagesFormat, encodable
from .sources.base import RawRecord

PAIR_SEPARATOR = "\n\n"

ChatFormat = Callable[[str, str], tuple[str, int]]
"""(prompt, gen) -> (training text, characters of it that belong to the prompt)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """A training sample: text, the ranges of it not trained on, path, metadata, and its stable id."""

    source: int
    file: int
    row: int
    text: str
    kind: str  # "pair", "messages", "text" or "content"
    path: str | None = None
    # with completion_only, the characters of text not trained on (a pair's prompt and separator, a conversation's
    # turns other than the assistant's), as flat sorted [start, end) pairs
    masked: tuple[int, ...] = ()
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
    return None if encodable(item) else "bad_utf8"


def normalise(record: RawRecord, pair_format: ChatFormat = plain_pair,
              messages_format: MessagesFormat | None = None) -> Sample | str:
    """Turn a raw record into a Sample, or return the malformed reason (missing_fields, bad_type, bad_utf8, the
    `chat_*` reasons of chat.py, ...).

    Detection order: pair, messages, text, content. A null field counts as missing, as a null column in Parquet
    or Arrow does. Every string that reaches the tokenizer (prompt and gen before any chat template, every turn of
    a conversation, text, content) is checked here. `messages` are rendered by `messages_format` (the
    tokenizer's chat template); without one they are malformed (`no_chat_template`).
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
        return Sample(*ids, text=text, kind="pair", masked=(0, prompt_chars) if prompt_chars else (),
                      task_type=_meta(value, "_task_type"), split=_meta(value, "_split"))
    if value.get("messages") is not None:
        if messages_format is None:
            return "no_chat_template"
        rendered = messages_format(value["messages"], value.get("tools"))
        if isinstance(rendered, str):
            return rendered
        text, masked = rendered
        return Sample(*ids, text=text, kind="messages", masked=masked, task_type=_meta(value, "_task_type"),
                      split=_meta(value, "_split"))
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
