"""`messages` records: rendered with real chat templates on the shipped tokenizer, masked to the token.

The reference is computed apart from the server's code: for a template with `{% generation %}` markers, TRL's own
tokenization for assistant-only loss (`trl.data_utils._tokenize` with `return_assistant_tokens_mask`, what
`SFTTrainer(assistant_only_loss=True)` runs); for a template without, the whole conversation tokenized once with
HF offsets and each token assigned to the assistant turn whose characters (from `apply_chat_template` on the
conversation's prefixes) hold it, checking that no token straddles a turn boundary.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sigil_feed.server.pipeline.chat import MAX_TURNS_BY_PREFIX, ChatRenderer
from sigil_feed.server.pipeline.samples import Sample, normalise
from sigil_feed.server.pipeline.sources.base import RawRecord
from sigil_feed.server.pipeline.sources.opening import open_source
from sigil_feed.server.pipeline.tokenize import Encoder
from sigil_feed.server.rows.spans import MaskedSpans, loss_mask
from tests.chat_templates import (
    LLAMA3,
    LLAMA3_MARKED,
    MALFORMED,
    TEMPLATES,
    by_offsets,
    chat_tokenizer,
    conversations,
    trl_reference,
)
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: chat_tokenizer(tmp_path_factory.mktemp(name), template) for name, template in TEMPLATES.items()}


def raw(value: dict[str, Any], row: int = 0) -> RawRecord:
    return RawRecord(source=0, file=0, row=row, location=f"chat.jsonl:{row + 1}", value=value)


def served(encoder: Encoder, records: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """Ids and loss mask of each record as the server encodes it for completion_only (EOS last)."""
    samples = [normalise(raw(r, i), encoder.chat_format, encoder.render_messages) for i, r in enumerate(records)]
    assert all(isinstance(s, Sample) for s in samples), samples
    batch = encoder.encode(samples, with_prompts=True)  # type: ignore[arg-type]
    mask, bounds = batch.loss_mask(), batch.offsets.tolist()
    return [(batch.ids[a:b].tolist(), mask[a:b].tolist()) for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_masks_equal_the_reference_token_by_token(folders: dict[str, Path], name: str) -> None:
    encoder = Encoder(str(folders[name]), backend="hf")
    reference = trl_reference if name == "llama3_marked" else by_offsets
    records = conversations()
    straddled = []
    for i, (record, (ids, mask)) in enumerate(zip(records, served(encoder, records), strict=True)):
        want_ids, want_mask, straddles = reference(encoder.tokenizer, record["messages"], record.get("tools"))
        assert ids[:-1] == want_ids and ids[-1] == encoder.eos_id
        assert mask[:-1] == want_mask, encoder.decode([i for i, m in zip(ids, mask, strict=True) if m])
        assert mask[-1] == want_mask[-1]  # the EOS is trained when the text ends trained
        assert 0 < sum(want_mask) < len(want_mask)
        straddled += [i] * straddles
    # Qwen-style ChatML renders a tool call with no content as "assistant\n" + "\n<tool_call>": tokenized whole,
    # one "\n\n" token would straddle the turn's start; the server cuts it there, as inference does
    assert straddled == ([2] if name == "chatml" else [])


def test_turn_by_turn_masks_equal_trl_on_the_marked_template(folders: dict[str, Path]) -> None:
    """Llama 3 without markers, masked from its renderings, trains on exactly what TRL does with the markers."""
    plain = Encoder(str(folders["llama3"]), backend="hf")
    marked = Encoder(str(folders["llama3_marked"]), backend="hf")
    for record, (ids, mask) in zip(conversations(), served(plain, conversations()), strict=True):
        assert (ids[:-1], mask[:-1], False) == trl_reference(marked.tokenizer, record["messages"], record.get("tools"))


def test_assistant_text_and_masks_in_characters(folders: dict[str, Path]) -> None:
    encoder = Encoder(str(folders["chatml"]), backend="hf")
    sample = normalise(raw(conversations()[1]), encoder.chat_format, encoder.render_messages)
    assert isinstance(sample, Sample) and sample.kind == "messages" and sample.task_type == "review"
    cuts = [0, *sample.masked, len(sample.text)]
    trained = [sample.text[a:b] for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a]
    assert trained == ["No: `x` is immutable. Declare it `let mut x`.<|im_end|>",
                       "`let x = 6;` shadows it, which is fine.<|im_end|>"]
    assert sample.text.startswith("<|im_start|>system\nYou are a careful Rust reviewer.<|im_end|>\n")


def test_tools_may_come_as_a_json_string(folders: dict[str, Path]) -> None:
    encoder = Encoder(str(folders["chatml"]), backend="hf")
    record = conversations()[2]
    as_string = {**record, "tools": json.dumps(record["tools"])}
    assert normalise(raw(as_string), messages_format=encoder.render_messages) == \
        normalise(raw(record), messages_format=encoder.render_messages)


def test_conversations_read_from_parquet_as_from_jsonl(folders: dict[str, Path], tmp_path: Path) -> None:
    """A `messages` column of structs (missing keys come back as nulls) and `tools` as a JSON string column."""
    encoder = Encoder(str(folders["llama3"]), backend="hf")
    records = [{**r, "tools": None} for r in conversations() if "tools" not in r] + [
        {**conversations()[2], "tools": json.dumps(conversations()[2]["tools"])}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "chat.parquet")
    write_jsonl(tmp_path / "chat.jsonl", records)
    read = {kind: [normalise(r, messages_format=encoder.render_messages) for r in
                   open_source(f"{kind}:{tmp_path}/chat.{ext}", 0, base_dir=tmp_path)]
            for kind, ext in (("parquet", "parquet"), ("local", "jsonl"))}
    assert all(isinstance(s, Sample) for s in read["local"]) and len(read["local"]) == len(records)
    assert [(s.text, s.masked) for s in read["parquet"]] == [(s.text, s.masked) for s in read["local"]]


def test_invalid_utf8_inside_a_parquet_conversation_is_one_bad_utf8_record(folders: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """Arrow does not check UTF-8 on write: bytes that are not UTF-8 in one turn's content (nested in the `messages`
    column's list of structs) make that record bad_utf8, and the records of the same batch around it are read."""
    encoder = Encoder(str(folders["chatml"]), backend="hf")
    contents = [b"hi", b"fine", b"caf\xe9", b"yo", b"again", b"ok"]
    content = pa.Array.from_buffers(pa.string(), len(contents), [
        None, pa.array(np.cumsum([0, *map(len, contents)]), pa.int32()).buffers()[1], pa.py_buffer(b"".join(contents))])
    roles = pa.array(["user", "assistant"] * 3)
    turns = pa.StructArray.from_arrays([roles, content], names=["role", "content"])
    messages = pa.ListArray.from_arrays(pa.array([0, 2, 4, 6], pa.int32()), turns)
    pq.write_table(pa.table({"messages": messages}), tmp_path / "chat.parquet")
    read = [normalise(r, messages_format=encoder.render_messages)
            for r in open_source(f"parquet:{tmp_path}/chat.parquet", 0, base_dir=tmp_path)]
    assert [s if isinstance(s, str) else s.kind for s in read] == ["messages", "bad_utf8", "messages"]


@pytest.mark.parametrize(("value", "reason"), MALFORMED)
def test_malformed_conversations_have_reasons(folders: dict[str, Path], value: dict[str, Any], reason: str) -> None:
    encoder = Encoder(str(folders["chatml"]), backend="hf")
    assert normalise(raw(value), encoder.chat_format, encoder.render_messages) == reason


def test_template_failures_are_reasons() -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    strict = "{% if messages[0].role != 'system' %}{{ raise_exception('a system turn first') }}{% endif %}x"
    last_differs = "{% for m in messages %}{{ m.content }}{% if loop.last %}!{% endif %}{% endfor %}"
    assert normalise(raw(good), messages_format=ChatRenderer(strict)) == "chat_template_error"
    assert normalise(raw(good), messages_format=ChatRenderer(last_differs)) == "chat_template_not_incremental"
    assert normalise(raw(good), messages_format=ChatRenderer(None)) == "no_chat_template"
    assert normalise(raw(good)) == "no_chat_template"
    drops_assistant = "{% for m in messages if m.role != 'assistant' %}{{ m.content }}{% endfor %}"
    assert normalise(raw(good), messages_format=ChatRenderer(drops_assistant)) == "chat_no_assistant"


def test_a_conversation_too_long_to_render_by_prefixes_is_counted_not_rendered(folders: dict[str, Path]) -> None:
    """Without markers the cost is the square of the turns (1,200 short turns: about 5 s here, holding every stream
    behind the record); with markers one rendering suffices, whatever the length."""
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i}"} for i in range(1200)]
    unmarked, marked = (Encoder(str(folders[name]), backend="hf").render_messages
                        for name in ("llama3", "llama3_marked"))
    assert unmarked(turns, None) == "chat_too_many_turns"
    assert not isinstance(unmarked(turns[:MAX_TURNS_BY_PREFIX], None), str)
    assert not isinstance(marked(turns, None), str)


def test_generation_markers_are_detected() -> None:
    assert ChatRenderer(LLAMA3_MARKED).marked and not ChatRenderer(LLAMA3).marked


def test_spans_split_join_and_mask_of_runs() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 200)
    per_sample = []
    for n in lengths.tolist():
        cuts = sorted(set(rng.integers(0, n + 1, rng.integers(0, 7)).tolist()))
        per_sample.append(cuts[:len(cuts) // 2 * 2])
    spans = MaskedSpans.of([[b for pair in zip(c[::2], c[1::2], strict=True) if pair[0] < pair[1] for b in pair]
                            for c in per_sample])
    prefix, rest = spans.split_prefix()
    joined = MaskedSpans.join_prefix(prefix, rest)
    assert np.array_equal(joined.bounds, spans.bounds) and np.array_equal(joined.offsets, spans.offsets)
    truth = [np.ones(n, dtype=np.uint8) for n in lengths.tolist()]
    for i, mask in enumerate(truth):
        for a, b in spans.sample(i).tolist():
            mask[a:b] = 0
    sample = rng.integers(0, len(lengths), 300)
    offset = np.array([rng.integers(0, lengths[s]) for s in sample])
    count = np.array([rng.integers(0, lengths[s] - o + 1) for s, o in zip(sample, offset, strict=True)])
    want = np.concatenate([truth[s][o:o + c] for s, o, c in zip(sample, offset, count, strict=True)])
    assert np.array_equal(loss_mask(spans, sample, offset, count), want)
    unmasked = loss_mask(MaskedSpans.none(len(lengths)), sample, offset, count)  # nothing masked: all trained
    assert unmasked.dtype == np.uint8 and np.array_equal(unmasked, np.ones(int(count.sum()), dtype=np.uint8))
