"""Chat templates set on the shipped tokenizer (nothing downloaded), and a set of OpenAI-style conversations.

CHATML follows Qwen2.5's (system turn, tools in the system prompt, `<tool_call>` blocks, tool results as
`<tool_response>` in a user turn), without `{% generation %}` markers. LLAMA3 follows Llama 3.1's layout
(`<|begin_of_text|>`, header ids, `<|eot_id|>`, tool results as `ipython` turns); LLAMA3_MARKED is the same
template with the assistant's content and `<|eot_id|>` inside `{% generation %}`, as TRL's assistant-only loss
needs.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

from tests.conftest import TOKENIZER_DIR

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"]

CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role in ['user', 'system'] %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{{- call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _llama3(marked: bool) -> str:
    start, end = ("{% generation %}", "{% endgeneration %}") if marked else ("", "")
    return (
        "{{- bos_token }}"
        "{%- if tools %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}"
        "{%- for tool in tools %}{{- (tool | tojson) + '\\n' }}{%- endfor %}{{- '<|eot_id|>' }}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message.role == 'assistant' %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}" + start +
        "{{- message.content or '' }}"
        "{%- for call in message.tool_calls or [] %}"
        "{{- '{\"name\": \"' + call.function.name + '\", \"parameters\": ' }}"
        "{{- (call.function.arguments | tojson) + '}' }}"
        "{%- endfor %}{{- '<|eot_id|>' }}" + end +
        "{%- elif message.role == 'tool' %}"
        "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
        "{%- else %}"
        "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    )


LLAMA3 = _llama3(marked=False)
LLAMA3_MARKED = _llama3(marked=True)
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama3_marked": LLAMA3_MARKED}


def by_offsets(tokenizer: Any, messages: list[Any], tools: Any) -> tuple[list[int], list[int], bool]:
    """Ids and each token's mask from the assistant turns' characters (apply_chat_template on the prefixes), and
    whether a token of the whole rendering straddles a turn's edge: then the ids are the pieces between the edges
    tokenized one by one (what the model sees at inference, where the prompt ends at the edge)."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    turns = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            head = tokenizer.apply_chat_template(messages[:k], tools=tools, tokenize=False, add_generation_prompt=True)
            turn = tokenizer.apply_chat_template(messages[:k + 1], tools=tools, tokenize=False)
            assert text.startswith(turn) and turn.startswith(head)
            turns.append((len(head), len(turn.rstrip())))
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    edges = sorted({0, len(text), *(edge for turn in turns for edge in turn)})
    if not any(a < edge < b for a, b in whole["offset_mapping"] for edge in edges):
        return whole["input_ids"], [int(any(s <= a and b <= e for s, e in turns))
                                    for a, b in whole["offset_mapping"]], False
    ids, mask = [], []
    for a, b in itertools.pairwise(edges):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(any(s <= a and b <= e for s, e in turns))] * len(piece)
    return ids, mask, True


def trl_reference(tokenizer: Any, messages: list[Any], tools: Any) -> tuple[list[int], list[int], bool]:
    """What TRL's SFTTrainer trains on with assistant_only_loss (generation-marked templates only)."""
    from trl.data_utils import _tokenize

    out = _tokenize(tokenizer, messages, tools=tools, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"]), False


def reference(template: str, tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int], bool]:
    """A record's ids and mask by `template`'s reference (TRL for the marked template, else by_offsets)."""
    return (trl_reference if template == "llama3_marked" else by_offsets)(tokenizer, record["messages"],
                                                                         record.get("tools"))


def chat_tokenizer(folder: Path, template: str) -> Path:
    """The shipped tokenizer with the chat special tokens added and `template` set, saved in `folder`."""
    from transformers import AutoTokenizer

    shutil.copytree(TOKENIZER_DIR, folder / "src")
    tokenizer = AutoTokenizer.from_pretrained(folder / "src", local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": CHAT_TOKENS})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder / "tokenizer")
    shutil.rmtree(folder / "src")
    return folder / "tokenizer"


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def conversations() -> list[dict[str, Any]]:
    """`messages` records: multi-turn, a system prompt, a tool call and its result, odd whitespace and text."""
    return [
        {"messages": [{"role": "user", "content": "Write a Rust function that adds two numbers."},
                      {"role": "assistant", "content": "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}"}]},
        {"messages": [{"role": "system", "content": "You are a careful Rust reviewer."},
                      {"role": "user", "content": "Is `let x = 5; x = 6;` valid?"},
                      {"role": "assistant", "content": "No: `x` is immutable. Declare it `let mut x`."},
                      {"role": "user", "content": "And shadowing?"},
                      {"role": "assistant", "content": "`let x = 6;` shadows it, which is fine."}],
         "_task_type": "review"},
        {"messages": [{"role": "user", "content": "What is the weather in Paris?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                      {"role": "tool", "content": "{\"temp_c\": 21, \"sky\": \"clear\"}"},
                      {"role": "assistant", "content": "It is 21 °C and clear in Paris."}],
         "tools": [WEATHER_TOOL]},
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "  中文 😀\r\n\tand tabs "},
                      {"role": "assistant", "content": " leading space, trailing spaces  \n\n"},
                      {"role": "user", "content": "Thanks!"}]},
        {"messages": [{"role": "user", "content": "Call two tools."},
                      {"role": "assistant", "content": "Calling both.", "tool_calls": [
                          {"type": "function",
                           "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
                          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                      {"role": "tool", "content": "cold"},
                      {"role": "tool", "content": "warm"},
                      {"role": "assistant", "content": "Oslo is cold; Rome is warm."}],
         "tools": [WEATHER_TOOL]},
    ]


MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"messages": []}, "chat_not_list"),
    ({"messages": "hello"}, "chat_not_list"),
    ({"messages": ["hello"]}, "chat_bad_message"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat_no_assistant"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}, "chat_no_assistant"),
    ({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "chat_bad_role"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "chat_bad_role"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]}, "chat_bad_content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                   {"role": "assistant", "content": "yo"}]}, "chat_bad_content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}, "chat_bad_content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": "f"}]}]},
     "chat_bad_tool_call"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": []}]}, "chat_bad_tool_call"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "tool_calls": [
        {"type": "function", "function": {"name": 3, "arguments": "{}"}}]}]}, "chat_bad_tool_call"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "assistant", "content": "x"}]}, "chat_bad_tool_call"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "tools": "all"},
     "chat_bad_tools"),
    ({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "yo"}]}, "bad_utf8"),
    # a lone surrogate where content is not: it reaches the rendered text, which the tokenizer cannot take
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f\ud800", "arguments": "{}"}}]}]}, "bad_utf8"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"city": "\udcff"}}}]}]}, "bad_utf8"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
      "tools": [{"type": "function", "function": {"name": "g\ud800", "parameters": {"type": "object"}}}]}, "bad_utf8"),
]
"""Conversations that are not trainable, with the reason each is counted under."""
