"""Multi-turn chat records (`messages`, OpenAI style): checked, then rendered with the tokenizer's chat template.

A conversation renders to one text plus the character ranges that are not trained on (everything but the
assistant turns). A template with `{% generation %}` markers says itself which characters are the assistant's
(the ranges transformers and TRL's assistant-only loss use); any other template is rendered one turn at a time:
assistant turn k is what rendering `messages[:k + 1]` adds to rendering `messages[:k]` with the generation
prompt, less its trailing whitespace (the template's separator between turns). A template that does not render
a conversation's turns as prefixes of the whole makes that record malformed (`chat_template_not_incremental`).
Rendering prefixes costs the square of the turns (400 short turns took 1 s, 1,200 about 5 s, on 2 busy cores;
every stream behind that record waits), so such a template takes at most MAX_TURNS_BY_PREFIX messages
(`chat_too_many_turns`); a template with markers renders once, whatever the length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_TURNS_BY_PREFIX = 512  # a template without markers renders a prefix per assistant turn: O(turns^2) messages
GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")

MessagesFormat = Callable[[list[Any], Any], "tuple[str, tuple[int, ...]] | str"]
"""(messages, tools) -> (text, masked character ranges as flat [start, end) pairs), or the malformed reason."""


def _tool_call_error(call: object) -> str | None:
    if not isinstance(call, dict):
        return "chat_bad_tool_call"
    function = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        return "chat_bad_tool_call"
    arguments = function.get("arguments")
    if not isinstance(function.get("name"), str) or not isinstance(arguments, str | dict):
        return "chat_bad_tool_call"
    return None


def _message_error(message: object) -> str | None:
    if not isinstance(message, dict):
        return "chat_bad_message"
    role = message.get("role")
    if role not in ROLES:
        return "chat_bad_role"
    content, calls = message.get("content"), message.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list) or not calls:
            return "chat_bad_tool_call"
        error = next((e for e in map(_tool_call_error, calls) if e), None)
        if error:
            return error
        if content is None:
            return None
    if not isinstance(content, str):
        return "chat_bad_content"
    return None if encodable(content) else "bad_utf8"


def conversation_error(messages: object, tools: object) -> str | None:
    """Why a `messages` value is not a trainable conversation (reason code), or None.

    Reasons: `chat_not_list` (not a non-empty list), `chat_bad_message` (an entry that is not an object),
    `chat_bad_role` (a role other than system, user, assistant, tool), `chat_bad_content` (content that is not
    a string; only an assistant turn with tool calls may omit it), `chat_bad_tool_call` (tool calls that are not
    a non-empty list of `{"type": "function", "function": {"name": str, "arguments": str or object}}` on an
    assistant turn), `chat_bad_tools` (`tools` not a list of objects), `chat_no_assistant` (no assistant turn),
    `bad_utf8`.
    """
    if not isinstance(messages, list) or not messages:
        return "chat_not_list"
    error = next((e for e in map(_message_error, messages) if e), None)
    if error:
        return error
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "chat_bad_tools"
    if not any(m["role"] == "assistant" for m in messages):
        return "chat_no_assistant"
    return None


def complement(spans: list[tuple[int, int]], length: int) -> tuple[int, ...]:
    """The ranges of [0, length) outside `spans` (sorted, disjoint), as flat [start, end) pairs."""
    out: list[int] = []
    at = 0
    for start, end in spans:
        if start > at:
            out += [at, start]
        at = max(at, end)
    if at < length:
        out += [at, length]
    return tuple(out)


def encodable(text: str) -> bool:
    """Whether text is valid UTF-8 once encoded (no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class NotIncremental(Exception):
    """A template rendered a conversation's prefix as something other than the start of the whole."""


class ChatRenderer:
    """Renders checked conversations with one chat template (see the module's rules)."""

    def __init__(self, template: str | None, **template_vars: Any) -> None:
        self.template, self.template_vars = template, template_vars
        self.marked = template is not None and GENERATION.search(template) is not None

    def _render(self, messages: list[Any], tools: Any, *, generation_prompt: bool = False,
                marks: bool = False) -> tuple[str, list[tuple[int, int]]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        assert self.template is not None
        rendered: Any = render_jinja_template([messages], tools=tools, chat_template=self.template,
                                              return_assistant_tokens_mask=marks,
                                              add_generation_prompt=generation_prompt, **self.template_vars)
        texts, indices = rendered
        return texts[0], ([(int(a), int(b)) for a, b in indices[0]] if marks else [])

    def __call__(self, messages: list[Any], tools: Any = None) -> tuple[str, tuple[int, ...]] | str:
        """(text, masked character ranges) of a conversation, or the malformed reason. `tools` may be a JSON
        string (as datasets often store it in a string column)."""
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except ValueError:
                return "chat_bad_tools"
        error = conversation_error(messages, tools)
        if error:
            return error
        if self.template is None:
            return "no_chat_template"
        if not self.marked and len(messages) > MAX_TURNS_BY_PREFIX:
            return "chat_too_many_turns"
        try:
            if self.marked:
                text, trained = self._render(messages, tools, marks=True)
            else:
                text, trained = self._by_turns(messages, tools)
        except NotIncremental:
            return "chat_template_not_incremental"
        except Exception:  # the template's own checks (raise_exception) and jinja errors
            return "chat_template_error"
        if not any(end > start for start, end in trained):
            return "chat_no_assistant"
        if not encodable(text):  # a lone surrogate in what content does not hold: a tool call, `tools`
            return "bad_utf8"
        return text, complement(sorted(trained), len(text))

    def _by_turns(self, messages: list[Any], tools: Any) -> tuple[str, list[tuple[int, int]]]:
        """Each assistant turn's characters, from renderings of the conversation's prefixes."""
        text = self._render(messages, tools)[0]
        trained = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head = self._render(messages[:k], tools, generation_prompt=True)[0]
            turn = self._render(messages[:k + 1], tools)[0]
            if not (turn.startswith(head) and text.startswith(turn)):
                raise NotIncremental
            trained.append((len(head), len(turn.rstrip())))
        return text, trained
