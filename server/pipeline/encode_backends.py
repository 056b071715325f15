"""The two encode backends as flat id buffers (HF `tokenizers`, `fastokens`), and the exactness probe between them.

Both encode a batch of texts into one uint32 buffer plus `len(texts) + 1` offsets. fastokens writes that
buffer itself (no per-token Python object); HF's ids come as Python lists, copied once into numpy. fastokens
is used only when it loads the HF tokenizer's own definition and gives identical ids on the probe strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any, Protocol

import numpy as np

FlatIds = tuple[np.ndarray, np.ndarray]
"""(ids: uint32, every text's ids concatenated; offsets: int64, len(texts) + 1 bounds into ids)."""


class FlatEncoder(Protocol):
    """Encodes a batch of texts (no special tokens added) into flat ids."""

    name: str

    def encode_flat(self, texts: Sequence[str]) -> FlatIds:
        """Every text's ids, concatenated, with the bounds of each."""
        ...


class HfFlat:
    """HF `tokenizers` (Rust, parallel over cores) with its ids copied once into numpy."""

    name = "hf"

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def encode_flat(self, texts: Sequence[str]) -> FlatIds:
        """Every text's ids, concatenated, with the bounds of each."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings)), out=offsets[1:])
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.uint32, count=int(offsets[-1]))
        return ids, offsets


class FastFlat:
    """fastokens: the same tokenizer definition, one flat buffer straight from Rust (the GIL released)."""

    name = "fastokens"

    def __init__(self, definition: str) -> None:
        import fastokens  # a server dependency, imported only when the backend is tried

        self.tokenizer = fastokens.Tokenizer.from_json_str(definition)

    def encode_flat(self, texts: Sequence[str]) -> FlatIds:
        """Every text's ids, concatenated, with the bounds of each."""
        ids, offsets = self.tokenizer.encode_batch_flat(list(texts), add_special_tokens=False)
        return np.frombuffer(ids, dtype="<u4"), np.frombuffer(offsets, dtype="<u8").astype(np.int64)


def load_fast(hf_backend: Any) -> FastFlat | str:
    """fastokens built from the HF backend's full definition (as transformers configured it), or why it cannot be."""
    try:
        return FastFlat(hf_backend.to_str())
    except ImportError as err:
        return f"fastokens is not installed ({err})"
    except Exception as err:  # fastokens raises ValueError/RuntimeError/panics for parts it does not support
        return f"fastokens cannot load this tokenizer ({type(err).__name__}: {err})"


FIXED_PROBES: tuple[str, ...] = (
    "", " ", "  ", "\n", "\t", "\r", "\r\n", "a\r\nb\r\n\r\nc\rd", "\n\n\n", " \n \n", "\t\t\tfn x() {}\r\n",
    " " * 1000, "\n" * 300, "\t" * 200, "a" * 4000, "ab" * 1500, "_" * 600, "=" * 257, "-" * 1000 + ">",
    "    " * 64 + "x", "!!!???...", "<<<<>>>>////\\\\\\\\", "'''\"\"\"```",
    "0", "7", "42", "123", "1234", "12345", "0123456789", "1234567890" * 40, "3.14159e-10", "0x7fff_ffff_u32",
    "1_000_000", "v1.2.3-rc.4", "١٢٣٤٥", "१२३", "１２３４", "①②③", "½¼¾", "x²y³",
    "你好，世界", "日本語のテキストです。", "한국어 텍스트", "fn 变量() -> 结果 {}", "中" * 300, "𠀀𠀁𪚥",
    "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇩🇪🇯🇵", "❤️", "😀" * 100, "a😀b😀c",
    "a\u200bb", "\u200b", "\u200c\u200d", "\u2060", "\ufeffBOM at start", "soft\u00adhyphen", "\u200e\u200f",
    "\x00", "a\x00b", "\x01\x02\x03\x1b[31mred\x1b[0m", "\x7f", "\x85", "\u2028\u2029", "\x0b\x0c",
    "e\u0301", "\u00e9", "A\u030a", "\u00c5", "\ufb01", "\u2126", "\u212b", "ǅ", "ß", "İı", "ΣΑΣ σας",
    "שלום עולם", "مرحبا بالعالم", "Привет, мир", "Ελληνικά", "ไทย", "देवनागरी",
    "\ue000", "\U0010ffff", "\ufffd", "\uffff", "\U0001f9ff\U0001fa70",
    "fn main() {\r\n\tprintln!(\"héllo, 世界 👋\");\r\n}\r\n",
    "/// Doc comment with `code` and ünïcödé.\npub struct Foo<'a> { x: &'a [u8] }\n",
    "let s = \"\\u{1F600}\\n\\t\\\\\";  // 😀",
    "#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() { assert_eq!(1 + 1, 2); }\n}\n",
    "<|endoftext|>", "<|endoftext", "<|endoftext|>x<|endoftext|>", "< |endoftext| >",
    "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<s>", "</s>", "<unk>", "<pad>", "[CLS]", "<|im_start|>",
)


def probe_texts(added: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """The strings both backends must agree on: fixed edge cases, each added token alone and in context, all of
    them joined, plus `extra` (chat template output, the data's first records)."""
    texts = list(FIXED_PROBES)
    for token in added:
        texts += [token, f"a{token}b", f" {token} ", f"{token}{token}", f"\n{token}\n", f"x{token[:-1]}"]
    texts.append("".join(texts))
    texts += extra
    return texts


def first_difference(a: FlatEncoder, b: FlatEncoder, texts: Sequence[str]) -> str | None:
    """None when both give identical ids for every text, else which text differs first."""
    ids_a, off_a = a.encode_flat(texts)
    ids_b, off_b = b.encode_flat(texts)
    if np.array_equal(off_a, off_b) and np.array_equal(ids_a, ids_b):
        return None
    for i, text in enumerate(texts):
        if not np.array_equal(ids_a[off_a[i]:off_a[i + 1]], ids_b[off_b[i]:off_b[i + 1]]):
            return f"probe {i} of {len(texts)} ({len(text)} characters, starting {text[:40]!r}) differs"
    return "the batch differs"
