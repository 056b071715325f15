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


@dataclass(frozen=True)
class TokenFacts:
    """What clients and the packer need to know of a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int


class Encoder:
    """Encodes samples with a fast tokenizer's Rust backend (parallel over cores, no per-token Python).

    The tokenizer's files are found and hashed at once (the fingerprint); the tokenizer itself loads on
    first use, so a restart that serves from a token store never imports transformers.
    """

    def __init__(self, name: str, *, base_dir: Path | None = None, file: str | None = None) -> None:
        self.name, self.file = name, file
        self.path = resolve_tokenizer(name, base_dir=base_dir, file=file)
        self.fingerprint = files_fingerprint(self.path)
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, loaded on first use; ConfigError if it cannot be used."""
        if self._tokenizer is None:
            tokenizer = load_tokenizer(str(self.path), file=self.file)
            if tokenizer.eos_token_id is None:
                raise ConfigError(f"tokenizer {self.name!r} has no EOS token", key="model_name", file=self.file,
                                  fix="use a tokenizer whose tokenizer_config.json sets eos_token")
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def backend(self) -> Any:
        """The Rust `tokenizers.Tokenizer`."""
        return self.tokenizer.backend_tokenizer

    @property
    def eos_id(self) -> int:
        """The id appended to every sample."""
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        """The padding id (EOS when the tokenizer has no pad token)."""
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else int(pad)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.tokenizer)

    def facts(self) -> TokenFacts:
        """Vocabulary size, EOS and padding ids (loads the tokenizer)."""
        return TokenFacts(self.vocab_size, self.eos_id, self.pad_id)

    def chat_format(self, prompt: str, gen: str) -> tuple[str, int]:
        """Format a pair with the tokenizer's chat template: (text, characters of the prompt turn)."""
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": gen}]
        text = self.tokenizer.apply_chat_template(turns, tokenize=False)
        head = self.tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
        return text, len(head) if text.startswith(head) else 0

    def encode(self, samples: list[Sample], with_prompts: bool) -> list[Encoded]:
        """Encode a batch of samples, EOS appended.

        With with_prompts (completion_only), a pair's prompt (and separator) and its completion are
        encoded separately and joined, so no token straddles the boundary and the loss mask is exact.
        """
        eos = np.array([self.eos_id], dtype=np.int32)
        if not with_prompts:
            encodings = self.backend.encode_batch_fast([s.text for s in samples], add_special_tokens=False)
            return [Encoded(np.concatenate((np.asarray(e.ids, dtype=np.int32), eos)), 0) for e in encodings]
        heads = self.backend.encode_batch_fast([s.text[:s.prompt_chars] for s in samples], add_special_tokens=False)
        tails = self.backend.encode_batch_fast([s.text[s.prompt_chars:] for s in samples], add_special_tokens=False)
        return [Encoded(np.concatenate((np.asarray(h.ids, dtype=np.int32), np.asarray(t.ids, dtype=np.int32), eos)),
                        len(h.ids)) for h, t in zip(heads, tails, strict=True)]

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text (special tokens kept, so sample boundaries show)."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))


def resolve_tokenizer(name: str, *, base_dir: Path | None = None, file: str | None = None) -> Path:
    """The tokenizer's folder: a local directory (relative to the working directory or base_dir) or a
    model in the local HF cache; ConfigError when neither exists (nothing is downloaded)."""
    for candidate in (Path(name), (base_dir or Path.cwd()) / name):
        if candidate.is_dir():
            return candidate.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as err:  # huggingface_hub raises several types for a name it cannot resolve offline
        raise ConfigError(f"cannot find tokenizer {name!r} ({type(err).__name__})", key="model_name", file=file,
                          fix="point model_name (or server.tokenizer) at a local tokenizer directory or a "
                              "model in the HF cache") from None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")


def files_fingerprint(folder: Path) -> str:
    """A hash of the tokenizer folder's files (weights excluded): any change to them changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def load_tokenizer(name: str, *, file: str | None = None) -> Any:
    """AutoTokenizer from a local directory or the HF cache, never downloading; ConfigError if unusable."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as err:  # transformers raises many types (OSError, ValueError, EnvironmentError)
        raise ConfigError(f"cannot load tokenizer {name!r}: {err}", key="model_name", file=file,
                          fix="point model_name (or server.tokenizer) at a local tokenizer directory "
                              "or a model in the HF cache") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer {name!r} has no fast (Rust) implementation", key="model_name",
                          file=file, fix="provide a tokenizer.json")
    return tokenizer
