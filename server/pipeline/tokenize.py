"""Load the tokenizer (`transformers.AutoTokenizer`, local directory or HF cache, or its saved snapshot) and encode
samples in batches."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import ConfigError
from ..paths import cache_home
from ..rows.spans import MaskedSpans, loss_mask
from ..store.format import TokenFacts
from .chat import ChatRenderer
from .encode_backends import FlatEncoder, HfFlat, first_difference, load_fast, probe_texts
from .samples import Sample
from .tokenizer_snapshot import TokenizerSnapshot, read_snapshot, snapshot_path, write_snapshot

log = logging.getLogger(__name__)


class Encoded(NamedTuple):
    """Token ids of one sample, EOS appended, and its masked token ranges (a tuple: one is made per sample, so it
    must be cheap)."""

    ids: np.ndarray  # int32
    masked: np.ndarray  # (k, 2) int32: [start, end) token ranges not trained on


@dataclass(frozen=True)
class EncodedBatch:
    """A batch of samples' token ids in one flat buffer: sample i is `ids[offsets[i]:offsets[i + 1]]`, EOS last."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, len(samples) + 1
    masked: MaskedSpans  # each sample's token ranges not trained on (none unless encoded with_prompts)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample, EOS included."""
        return np.diff(self.offsets)

    def samples(self) -> list[Encoded]:
        """Every sample as a view into the buffer."""
        bounds, ids = self.offsets.tolist(), self.ids
        return [Encoded(ids[bounds[i]:bounds[i + 1]], self.masked.sample(i)) for i in range(len(self))]

    def loss_mask(self) -> np.ndarray:
        """The uint8 loss mask of every token of `ids` (1 = trained)."""
        lengths = self.lengths
        return loss_mask(self.masked, np.arange(len(lengths)), np.zeros(len(lengths), dtype=np.int64), lengths)


class Encoder:
    """Encodes samples with a fast tokenizer's Rust backend (parallel over cores, no per-token Python).

    The tokenizer's files are found and hashed at once (the fingerprint); the tokenizer itself loads on
    first use, from its snapshot when one was saved (tokenizer_snapshot.py: the backend transformers built,
    without importing transformers), so a restart never imports transformers unless it renders chat templates
    or decodes. Ids come from the `backend` setting's encoder (see `choose_backend`); decoding is always HF's.
    """

    def __init__(self, name: str, *, base_dir: Path | None = None, file: str | None = None,
                 backend: str = "auto") -> None:
        self.name, self.file, self.requested = name, file, backend
        self.path = resolve_tokenizer(name, base_dir=base_dir, file=file)
        self.fingerprint = files_fingerprint(self.path)
        self._tokenizer: Any = None
        self._snapshot: TokenizerSnapshot | None = None
        self._flat: FlatEncoder | None = None  # the encode backend, once chosen
        self._matched: set[str] = set()  # probe strings on which that fastokens gave HF's ids
        self._chat: ChatRenderer | None = None

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, loaded on first use; ConfigError if it cannot be used."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(str(self.path), file=self.file)
        return self._tokenizer

    @property
    def snapshot(self) -> TokenizerSnapshot:
        """The tokenizer's Rust backend and facts: saved ones, else taken from transformers and saved; ConfigError
        if the tokenizer cannot be used."""
        if self._snapshot is None:
            path = snapshot_path(cache_home(), self.fingerprint)
            snapshot = read_snapshot(path)
            if snapshot is None:
                snapshot = TokenizerSnapshot.of(self.tokenizer)
                write_snapshot(path, snapshot)
            if snapshot.facts.eos_id is None:
                raise ConfigError(f"tokenizer {self.name!r} has no EOS token", key="model_name", file=self.file,
                                  fix="use a tokenizer whose tokenizer_config.json sets eos_token")
            self._snapshot = snapshot
        return self._snapshot

    @property
    def backend(self) -> Any:
        """The Rust `tokenizers.Tokenizer`."""
        return self.snapshot.backend

    @property
    def backend_name(self) -> str:
        """Which encoder makes the ids: `hf` or `fastokens` (chosen on first use if not yet)."""
        return self.flat.name

    @property
    def flat(self) -> FlatEncoder:
        """The encode backend; chosen with the fixed probe strings alone if `choose_backend` was not called."""
        if self._flat is None:
            self.choose_backend()
        assert self._flat is not None
        return self._flat

    def choose_backend(self, data: Sequence[Sample] = (), chat: bool = False) -> str:
        """Pick the encode backend for the `backend` setting and return its name.

        `hf`: HF. `auto`/`fastokens`: fastokens if it loads this tokenizer and gives HF's ids on every probe
        string (fixed edge cases, the added tokens, chat template output when `chat`, and the texts `data`'s
        samples are encoded as); otherwise `auto` falls back to HF with one log line and `fastokens` raises
        ConfigError; either way one log line says which and why. Called again (another dataset), it re-probes
        with that call's data.
        """
        hf = HfFlat(self.backend)
        if self.requested == "hf" or (self._flat is not None and self._flat.name == "hf"):
            self._flat = hf
            return hf.name
        fast = self._flat or load_fast(self.backend)
        probes = self._probes(data, chat)
        why = fast if isinstance(fast, str) else self._difference(hf, fast, probes)
        if why is None:
            assert not isinstance(fast, str)
            log.info("tokenizer %s: encoding with fastokens (HF's ids on all %d probe strings)", self.name, len(probes))
            self._flat = fast
            return fast.name
        if self.requested == "fastokens":
            raise ConfigError(f"tokenizer {self.name!r}: {why}", key="dataset.tokenizer_backend", file=self.file,
                              fix="set tokenizer_backend: auto (or hf) to encode with HF tokenizers")
        log.info("tokenizer %s: encoding with HF tokenizers, not fastokens: %s", self.name, why)
        self._flat = hf
        return hf.name

    def _difference(self, hf: FlatEncoder, fast: FlatEncoder, probes: list[str]) -> str | None:
        """first_difference of the probes, encoding only those this encoder's fastokens has not yet matched HF on
        (both are deterministic: a later dataset re-probes with its own data, not the fixed strings again)."""
        fresh = [text for text in probes if text not in self._matched]
        if not fresh or first_difference(hf, fast, fresh) is None:
            self._matched.update(fresh)
            return None
        return first_difference(hf, fast, probes)  # the reason names the probe's place among all of them

    def _probes(self, data: Sequence[Sample], chat: bool) -> list[str]:
        """The probe strings: fixed, added tokens, chat template output, and what `data` is encoded as."""
        added = self.snapshot.facts.added
        extra = [text for s in data for text in (s.text, *(_pieces(s) if s.masked else ()))]
        if chat:
            for prompt, gen in CHAT_PROBES:
                text, head = self.chat_format(prompt, gen)
                extra += [text, text[:head], text[head:]]
        return probe_texts(added, extra)

    @property
    def eos_id(self) -> int:
        """The id appended to every sample."""
        eos = self.snapshot.facts.eos_id
        assert eos is not None  # checked when the snapshot loads
        return eos

    @property
    def pad_id(self) -> int:
        """The padding id (EOS when the tokenizer has no pad token)."""
        pad = self.snapshot.facts.pad_id
        return self.eos_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.snapshot.facts.vocab_size

    def facts(self) -> TokenFacts:
        """Vocabulary size, EOS and padding ids (loads the tokenizer)."""
        return TokenFacts(self.vocab_size, self.eos_id, self.pad_id)

    @property
    def render_messages(self) -> ChatRenderer:
        """A conversation's text and masked characters, with the tokenizer's chat template (chat.py)."""
        if self._chat is None:
            self._chat = ChatRenderer(self.tokenizer.chat_template, **self.tokenizer.special_tokens_map)
        return self._chat

    def format_messages(self, messages: list[Any], tools: Any = None) -> tuple[str, tuple[int, ...]] | str:
        """A conversation's text and masked characters, or its malformed reason (loads the tokenizer on first use:
        a server that serves from a token store never does)."""
        return self.render_messages(messages, tools)

    def chat_format(self, prompt: str, gen: str) -> tuple[str, int]:
        """Format a pair with the tokenizer's chat template: (text, characters of the prompt turn)."""
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": gen}]
        text = self.tokenizer.apply_chat_template(turns, tokenize=False)
        head = self.tokenizer.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
        return text, len(head) if text.startswith(head) else 0

    def encode(self, samples: Sequence[Sample], with_prompts: bool) -> EncodedBatch:
        """Encode a batch of samples into one flat buffer, EOS appended to each (no per-token Python).

        With with_prompts (completion_only), each sample is cut at its masked character ranges (a pair's prompt
        and separator; a conversation's turns other than the assistant's) and the pieces are encoded as separate
        texts, side by side in one call, so no token straddles a boundary and the loss mask is exact. The EOS
        appended to a conversation is masked when its text ends masked.
        """
        if not with_prompts:
            ids, bounds = self.flat.encode_flat([s.text for s in samples])
            masked = MaskedSpans.none(len(samples))
        else:
            pieces = [_pieces(s) for s in samples]
            ids, cuts = self.flat.encode_flat([piece for p in pieces for piece in p])
            per = np.fromiter(map(len, pieces), np.int64, len(pieces))
            bounds = cuts[np.concatenate(([0], np.cumsum(per)))]
            masked = _token_spans(cuts, bounds, per, samples)
        # EOS goes in front of the next sample's first token; the int32 view is exact (ids < 2**31)
        return EncodedBatch(np.insert(ids.view(np.int32), bounds[1:], self.eos_id),
                            bounds + np.arange(len(bounds)), masked)

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text (special tokens kept, so sample boundaries show)."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))


CHAT_PROBES = (("Write a function.", "fn f() {}"), ("  <|endoftext|> \r\n中文 😀", "\n\n"), ("", "x"))


def _pieces(sample: Sample) -> list[str]:
    """A sample's text cut at its masked ranges: what completion_only encodes (odd pieces are masked)."""
    cuts = [0, *sample.masked, len(sample.text)]
    return [sample.text[a:b] for a, b in pairwise(cuts)]


def _token_spans(cuts: np.ndarray, bounds: np.ndarray, per: np.ndarray, samples: Sequence[Sample]) -> MaskedSpans:
    """The masked token ranges of samples encoded as pieces (`cuts`: the pieces' token bounds, `bounds`: the
    samples', `per`: pieces per sample), each range relative to its sample's first token. A conversation that
    ends masked (a template's separator after its last turn, a user turn last) masks its EOS too; a pair's EOS is
    trained, as it always was."""
    piece_start = cuts[:-1] - np.repeat(bounds[:-1], per)  # every piece's first token within its sample
    odd = np.concatenate([np.arange(1, n, 2, dtype=np.int64) + first
                          for n, first in zip(per.tolist(), (np.cumsum(per) - per).tolist(), strict=True)]
                         or [np.zeros(0, dtype=np.int64)])
    ends = piece_start[odd] + (cuts[odd + 1] - cuts[odd])
    ends_text = np.array([s.kind == "messages" and bool(s.masked) and s.masked[-1] == len(s.text) for s in samples],
                         dtype=bool)
    last = np.cumsum(per // 2) - 1  # each sample's last masked range (per is odd: 2 * ranges + 1)
    ends[last[ends_text]] += 1  # the EOS
    flat = np.empty(2 * len(odd), dtype=np.int32)
    flat[0::2], flat[1::2] = piece_start[odd], ends
    return MaskedSpans(flat, np.concatenate(([0], np.cumsum(per // 2))))


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
