"""`messages` records through a real server and the real client: two chat templates, streaming and cached mode,
packing and completion_only on, every label checked token by token against a reference computed apart from the
server (tests/chat_templates.py: TRL's assistant-only tokenization, or prefix renderings with HF offsets), and
every malformed conversation counted under its reason (fatal under `on_bad_record: fail`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from transformers import AutoTokenizer

from sigil_feed.client import FeedDataset
from sigil_feed.client.stream import FeedServerError
from tests.chat_templates import MALFORMED, TEMPLATES, chat_tokenizer, conversations, reference
from tests.conftest import ServerProcess, write_config, write_jsonl
from tests.integration.test_sources_e2e import ServedData

IGNORE = -100
SEQ_LEN = 48  # short rows: conversations continue across rows, turn edges fall anywhere in a row
CHAT_TEMPLATES = ("chatml", "llama3_marked")
pytestmark = pytest.mark.filterwarnings("ignore::sigil_feed.client.PackedAttentionWarning")  # no model here
MODES = ("streaming", "cached")


def records() -> list[dict[str, Any]]:
    """The good conversations with the malformed ones between them."""
    good, bad = conversations(), [value for value, _ in MALFORMED]
    out: list[dict[str, Any]] = []
    for i, record in enumerate(good):
        out += [record, *bad[3 * i:3 * i + 3]]
    return out + bad[3 * len(good):]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServedData, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("chat-e2e")
    folders = {name: chat_tokenizer(root / name, TEMPLATES[name]) for name in CHAT_TEMPLATES}
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))  # json.dumps keeps "\ud800" escaped
    bad = write_jsonl(root / "bad.jsonl", [conversations()[0], MALFORMED[5][0]])
    datasets = {f"{name}-{mode}": {"model_name": str(folders[name]), "dataset": {
        "names": [f"local:{data}"], "use_cache": mode == "cached", "cache_dir": str(root / "cache"),
        "completion_only": True, "epochs": 1, "remainder": "keep"}}
        for name in CHAT_TEMPLATES for mode in MODES}
    datasets["strict"] = {"model_name": str(folders["chatml"]), "dataset": {
        "names": [f"local:{bad}"], "use_cache": False, "on_bad_record": "fail", "epochs": 1}}
    config = write_config(root / "trainer.yaml", None, max_seq_len=SEQ_LEN, pack=True,
                          server={"datasets": datasets})
    server = ServerProcess(config)
    try:
        yield ServedData(server), folders
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def stream(target: str, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The epoch's packed rows, end to end: ids, labels, and whether each token starts a segment."""
    ids, labels, starts = [], [], []
    for batch in FeedDataset(target, dataset, batch_size=2):
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        assert batch["input_ids"].shape[1] == SEQ_LEN
        ids.append(batch["input_ids"].numpy().reshape(-1))
        labels.append(batch["labels"].numpy().reshape(-1))
        starts.append(batch["position_ids"].numpy().reshape(-1) == 0)
    return np.concatenate(ids), np.concatenate(labels), np.concatenate(starts)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_labels_equal_the_reference_token_by_token(served: tuple[ServedData, dict[str, Path]], template: str,
                                                   mode: str) -> None:
    data, folders = served
    tokenizer = AutoTokenizer.from_pretrained(str(folders[template]), local_files_only=True)
    eos = tokenizer.eos_token_id
    expected = {}
    for record in conversations():
        ref_ids, ref_mask, _ = reference(template, tokenizer, record)
        expected[(*ref_ids, eos)] = [*ref_mask, ref_mask[-1]]  # the EOS: trained when the conversation ends so
    ids, labels, starts = stream(data.target, f"{template}-{mode}")
    total = sum(len(k) for k in expected)
    assert (labels[total:] == IGNORE).all()  # the last row's padding
    ends = np.flatnonzero(ids[:total] == eos) + 1
    samples = np.split(np.arange(total), ends[:-1])
    assert ends[-1] == total
    assert Counter(tuple(ids[s].tolist()) for s in samples) == Counter(list(expected))  # each conversation once
    crossing = 0
    for positions in samples:
        mask = expected[tuple(ids[positions].tolist())]
        for k, p in enumerate(positions.tolist()):
            first = k == 0 or p % SEQ_LEN == 0  # a segment's first token: no label, as the flattening collator
            assert starts[p] == first
            assert labels[p] == (IGNORE if first or not mask[k] else ids[p]), (template, mode, p, k)
            crossing += k > 0 and p % SEQ_LEN == 0
    assert crossing >= 3  # conversations do continue across rows


def test_malformed_conversations_are_counted_with_reasons(served: tuple[ServedData, dict[str, Path]]) -> None:
    data, _ = served
    for name in (f"{t}-{m}" for t in CHAT_TEMPLATES for m in MODES):
        stream(data.target, name)
    stats = data.stats()
    want = {"read": len(records()), "kept": len(conversations()), "dropped": {},
            "malformed": dict(Counter(reason for _, reason in MALFORMED))}
    for name in (f"{t}-{m}" for t in CHAT_TEMPLATES for m in MODES):
        [source] = stats[name]
        assert {k: v for k, v in source.items() if k != "spec"} == want, (name, source["malformed"])


def test_a_malformed_conversation_is_fatal_in_fail_mode(served: tuple[ServedData, dict[str, Path]]) -> None:
    data, _ = served
    with pytest.raises(FeedServerError) as info:
        stream(data.target, "strict")
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert "bad.jsonl:2" in info.value.details and "chat_bad_role" in info.value.details


def test_the_cached_store_keeps_the_turns_masks_as_format_3(served: tuple[ServedData, dict[str, Path]]) -> None:
    """Masked ranges after a prefix make the store format 3: an older server refuses it instead of training on
    every turn."""
    cache = served[1]["chatml"].parent.parent / "cache"
    manifests = [json.loads(path.read_text()) for path in cache.glob("*/manifest.json")]
    assert len(manifests) == len(CHAT_TEMPLATES)
    assert all(m["format"] == 3 and sum(s["masked_spans"] for s in m["shards"]) > 0 for m in manifests)
