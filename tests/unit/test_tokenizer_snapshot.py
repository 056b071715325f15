"""Tokenizer snapshots: what a later start loads without transformers is the very backend transformers built (same
ids on real text and fuzz strings, same facts), for three tokenizers; a start that has a snapshot never imports
transformers; a damaged snapshot is made again; a tokenizer without EOS is refused either way."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sigil_feed.server.errors import ConfigError
from sigil_feed.server.pipeline import tokenize
from sigil_feed.server.pipeline.tokenizer_snapshot import snapshot_path
from tests.conftest import TOKENIZER_DIR, write_metaspace_tokenizer
from tests.unit.test_tokenize_backend import corpus_samples, fuzz_strings


@pytest.fixture(params=["embedded", "metaspace", "deepseek"])
def tokenizer_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The embedded 8k tokenizer, a SentencePiece-style one, and the DeepSeek 129k one."""
    if request.param == "embedded":
        return TOKENIZER_DIR
    if request.param == "metaspace":
        return write_metaspace_tokenizer(tmp_path / "metaspace")
    return Path(request.getfixturevalue("deepseek_tokenizer"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty SIGIL_FEED_CACHE."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("SIGIL_FEED_CACHE", str(folder))
    return folder


def test_a_snapshot_encodes_exactly_as_transformers_does(tokenizer_dir: Path, cache: Path) -> None:
    first = tokenize.Encoder(str(tokenizer_dir), backend="hf")
    first.facts()  # the first load: from transformers, saved
    assert snapshot_path(cache, first.fingerprint).is_file()
    again = tokenize.Encoder(str(tokenizer_dir), backend="hf")
    assert again.snapshot is not first.snapshot and again._tokenizer is None  # read back, transformers not loaded
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    facts = again.snapshot.facts
    assert (facts.eos_id, facts.pad_id, facts.vocab_size) == (hf.eos_token_id, hf.pad_token_id, len(hf))
    assert facts.added == [token.content for token in hf.added_tokens_decoder.values()]
    texts = [s.text for s in corpus_samples()] + fuzz_strings(facts.added, n=400)
    want = [e.ids for e in hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    got = [e.ids for e in again.backend.encode_batch(texts, add_special_tokens=False)]
    assert got == want
    assert again.encode(corpus_samples(), with_prompts=True).ids.tolist() == \
        first.encode(corpus_samples(), with_prompts=True).ids.tolist()


def test_a_start_with_a_snapshot_never_imports_transformers(cache: Path) -> None:
    tokenize.Encoder(str(TOKENIZER_DIR)).facts()
    code = ("import sys; from sigil_feed.server.pipeline.tokenize import Encoder; "
            f"e = Encoder({str(TOKENIZER_DIR)!r}); "
            "print(e.encode([], with_prompts=False).ids.size, e.facts().eos_id, e.backend_name, "
            "'transformers' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"SIGIL_FEED_CACHE": str(cache), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split()[-2:] == ["False", "False"]


def test_a_damaged_snapshot_is_made_again(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    encoder = tokenize.Encoder(str(TOKENIZER_DIR))
    want = encoder.encode(corpus_samples(), with_prompts=False).ids.tolist()
    path = snapshot_path(cache, encoder.fingerprint)
    for damage in ("{not json", json.dumps({"format": 1, "backend": "{}", "facts": {}}), ""):
        path.write_text(damage)
        with caplog.at_level(logging.WARNING):
            again = tokenize.Encoder(str(TOKENIZER_DIR))
            assert again.encode(corpus_samples(), with_prompts=False).ids.tolist() == want
        assert "damaged" in caplog.text
        assert json.loads(path.read_text())["format"] == 1  # saved whole again
        caplog.clear()


def test_a_tokenizer_without_eos_is_refused_from_a_snapshot_too(tmp_path: Path, cache: Path) -> None:
    folder = write_metaspace_tokenizer(tmp_path / "no-eos")
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token": None}))
    for _ in range(2):  # from transformers, then from the snapshot it saved
        with pytest.raises(ConfigError, match="no EOS token"):
            tokenize.Encoder(str(folder)).facts()
