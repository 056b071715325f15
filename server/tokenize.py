"""Load the tokenizer (`transformers.AutoTokenizer`, local directory or HF cache) and encode samples in batches."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .samples import Sample


@dataclass(frozen=True)
class Encoded:
    """Token ids of one sample, EOS appended, and how many leading tokens belong to its prompt."""

    ids: np.ndarray  # int32
    prompt_tokens: int


class Encoder:
    """Encodes samples with a fast tokenizer's Rust backend (parallel over cores, no per-token Python)."""

    def __init__(self, name: str, *, base_dir: Path | None = None, file: str | None = None) -> None:
        self.name = name
        self.tokenizer = load_tokenizer(name, base_dir=base_dir, file=file)
        self.backend = self.tokenizer.backend_tokenizer
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(f"tokenizer {name!r} has no EOS token", key="model_name", file=file,
                              fix="use a tokenizer whose tokenizer_config.json sets eos_token")
        self.eos_id = int(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.vocab_size = len(self.tokenizer)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)

    def chat_format(self, prompt: str, gen: str) -> tuple[str, int]:
        """Format a pair with the tokenizer's chat template: (text, characters of the prompt turn)."""
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": gen}]
        text = self.tokenizer.apply_chat_template(turns, tokenize=False)
        head = self.tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
        return text, len(head) if text.startswith(head) else 0

    def encode(self, samples: list[Sample], with_prompts: bool) -> list[Encoded]:
        """Encode a batch of samples; prompt token counts only when with_prompts (needs offsets)."""
        texts = [s.text for s in samples]
        eos = np.array([self.eos_id], dtype=np.int32)
        if not with_prompts:
            return [Encoded(np.concatenate((np.asarray(e.ids, dtype=np.int32), eos)), 0)
                    for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        out = []
        for sample, enc in zip(samples, self.backend.encode_batch(texts, add_special_tokens=False), strict=True):
            starts = np.fromiter((o[0] for o in enc.offsets), dtype=np.int64, count=len(enc.offsets))
            prompt_tokens = int(np.searchsorted(starts, sample.prompt_chars, side="left"))
            out.append(Encoded(np.concatenate((np.asarray(enc.ids, dtype=np.int32), eos)), prompt_tokens))
        return out

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text (special tokens kept, so sample boundaries show)."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))


def _resolve(name: str, base_dir: Path | None) -> str:
    if base_dir is not None and not Path(name).exists() and (base_dir / name).exists():
        return str(base_dir / name)
    return name


def load_tokenizer(name: str, *, base_dir: Path | None = None, file: str | None = None) -> Any:
    """AutoTokenizer from a local directory or the HF cache, never downloading; ConfigError if unusable."""
    from transformers import AutoTokenizer

    path = _resolve(name, base_dir)
    offline = not Path(path).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except Exception as err:  # transformers raises many types (OSError, ValueError, EnvironmentError)
        raise ConfigError(f"cannot load tokenizer {name!r}: {err}", key="model_name", file=file,
                          fix="point model_name (or server.tokenizer) at a local tokenizer directory "
                              "or a model in the HF cache") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer {name!r} has no fast (Rust) implementation", key="model_name",
                          file=file, fix="provide a tokenizer.json")
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's full definition (vocab, merges, normalizer, special tokens)."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(str(sorted(tokenizer.special_tokens_map.items())).encode())
    return digest.hexdigest()[:16]

