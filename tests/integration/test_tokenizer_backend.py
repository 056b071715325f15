"""The fastokens backend through the server: a streaming epoch's samples are exactly HF's encodings of the kept
records, and a forced backend that cannot serve a tokenizer stops `serve` at start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sigil_feed.client import FeedDataset
from sigil_feed.server.config import DatasetSection
from sigil_feed.server.pipeline.filters import make_filter
from tests.conftest import DEFAULT_DIR, TOKENIZER_DIR, rust_pair, write_config, write_jsonl, write_metaspace_tokenizer


def kept_texts() -> list[str]:
    """The embedded default's train records (real Rust) that the default filters keep, as training texts."""
    rule = make_filter(DatasetSection())
    texts = []
    for line in (DEFAULT_DIR / "default.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("_split", "train") != "train":
            continue
        if "prompt" in record:
            texts.append(record["prompt"] + "\n\n" + record["gen"])
        elif rule(record["path"], record["content"]) is None:
            texts.append(record["content"])
    return texts


@pytest.mark.parametrize("which", ["embedded", "deepseek"])
def test_streaming_epoch_equals_hf_encodings_of_the_kept_records(tmp_path: Path, start_server,
                                                                 request: pytest.FixtureRequest, which: str) -> None:
    tokenizer_dir = TOKENIZER_DIR if which == "embedded" else request.getfixturevalue("deepseek_tokenizer")
    dataset = {"names": [f"local:{DEFAULT_DIR / 'default.jsonl'}"], "use_cache": False, "epochs": 1,
               "remainder": "keep", "tokenizer_backend": "fastokens"}  # forced: serve fails unless it is used
    config = write_config(tmp_path / "t.yaml", dataset, model_name=str(tokenizer_dir), max_seq_len=8192, pack=False)
    server = start_server(config)
    served = []
    for batch in FeedDataset(server.target, batch_size=16):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            served.append(ids[mask.bool()].tolist())
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    expected = [[*e.ids, hf.eos_token_id]
                for e in hf.backend_tokenizer.encode_batch(kept_texts(), add_special_tokens=False)]
    assert len(served) == len(expected) > 300
    assert served == expected


def test_forced_fastokens_on_a_tokenizer_it_cannot_load_stops_serve(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "pairs.jsonl", [rust_pair(0)])
    tokenizer = write_metaspace_tokenizer(tmp_path / "tok")
    config = write_config(tmp_path / "t.yaml", {"names": ["local:pairs.jsonl"], "tokenizer_backend": "fastokens"},
                          model_name=str(tokenizer))
    result = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "serve", "--config", str(config),
                             "--port", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "dataset.tokenizer_backend" in result.stderr and "Metaspace" in result.stderr
