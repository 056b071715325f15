"""Build the embedded default dataset and tokenizer in ``server/default/`` from the real Rust corpus.

``sigil-feed serve`` with no config serves what this script writes, with no network and no hub:

* ``server/default/default.jsonl``: about 300 pipeline pairs (``prompt`` = one function signature line,
  ``gen`` = its body; ``_source: "debian-crates"``, ``_split`` 90 % train / 10 % val,
  ``_task_type: "completion"``) followed by about 60 code-file records ``{"content", "path"}`` of 1-8 KB.
  A few code files sit under ``tests/``, ``benches/`` or ``examples/`` or contain ``#[cfg(test)]``, so
  the default filters visibly drop some.
* ``server/default/tokenizer/``: a byte-level BPE tokenizer (vocab 8192, ``<|endoftext|>`` = id 0 =
  EOS = PAD, a plain-text chat template) trained with ``tokenizers`` on about 16 MB of the corpus's
  Rust files; ``transformers.AutoTokenizer.from_pretrained`` loads it offline as a fast tokenizer.

How to run it (from the repository root; the corpus lives outside the repository)::

    sudo /work/shared/tools/make-rust-corpus /work/corpus   # -> code.jsonl, pairs.jsonl
    .venv/bin/python scripts/make_default_dataset.py --corpus /work/corpus

The corpus tool writes ``code.jsonl`` (``{"content", "path", "size"}``, sorted by path) and
``pairs.jsonl`` (``{"prompt", "gen", "_source": <crate dir>, "_split", "_task_type"}``); this script
reads only those two files. The selection is deterministic: every choice is ordered by a SHA-256 of
the seed and the record, never by Python's ``random``, so the same corpus and seed give byte-identical
output (the corpus itself depends on the Debian package versions that apt installs). At the end the
script reloads the tokenizer with ``AutoTokenizer`` offline, checks that every record of
``default.jsonl`` round-trips exactly through encode/decode, and prints sizes and bytes per token.
Use ``--check`` to run only that verification on the files already in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "server" / "default"

EOS = "<|endoftext|>"
SOURCE = "debian-crates"
# A plain-text template: "<|user|>\n{prompt}\n<|assistant|>\n{gen}\n". EOS is appended by the server.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Pre-tokenization for code: the cl100k-style split without the English contractions (which would cut
# Rust lifetimes such as 'static into 's + tatic); digits in runs of at most three; newlines kept apart
# from the indentation that follows them. ByteLevel then maps every byte, so any UTF-8 text round-trips.
SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Crates that are mostly generated FFI bindings or intrinsics: poor examples of Rust for the default data.
SKIP_CRATES = ("winapi-", "windows-sys-", "windows_", "libc-", "linux-raw-sys-", "compiler_builtins-",
               "js-sys-", "web-sys-", "libm-")
SIGNATURE = re.compile(r"(?:pub(?:\([^)]*\))? )?(?:const )?(?:async )?(?:unsafe )?(?:extern \"C\" )?fn \w+")


def stable_key(seed: int, *parts: str) -> str:
    """A deterministic pseudo-random sort key for a record (independent of Python's hash and random)."""
    h = hashlib.sha256(str(seed).encode())
    for part in parts:
        h.update(b"\0")
        h.update(part.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
        return False
    return True


def path_dirs(path: str) -> set[str]:
    return set(path.split("/")[:-1])


def skipped_crate(crate: str) -> bool:
    return crate.startswith(SKIP_CRATES)


# ---------------------------------------------------------------------------------------------- pairs


def normalise_pair(prompt: str, gen: str) -> tuple[str, str] | None:
    """A one-line signature prompt and a dedented body ending in a newline, or None if unsuitable."""
    if "\n" in prompt.strip() or "///" in prompt or not gen.startswith("\n"):
        return None
    indent = prompt[: len(prompt) - len(prompt.lstrip())]
    prompt = prompt.strip()
    if not SIGNATURE.match(prompt) or not prompt.endswith("{") or len(prompt) > 120:
        return None
    name = prompt.split("fn ", 1)[1].split("(")[0]
    if "test" in name or "bench" in name:  # #[test] functions: keep the pairs about library code
        return None
    lines = gen[1:].split("\n")
    if lines[-1] != indent + "}":  # the closing brace must line up with the signature (not a mid-line match)
        return None
    if indent and any(line and not line.startswith(indent) for line in lines):
        return None
    body = "\n".join(line[len(indent):] for line in lines).rstrip() + "\n"
    if not body.endswith("}\n") or body.count("\n") < 3 or not 60 <= len(body) <= 1200:
        return None
    return prompt, body


def select_pairs(path: Path, n: int, seed: int, per_crate: int = 4,
                 val_every: int = 10) -> list[dict[str, Any]]:
    """n function pairs from the corpus's pairs.jsonl, at most per_crate per crate, 1 in val_every val."""
    candidates: list[tuple[str, str, str, str]] = []
    seen: set[str] = set()
    for rec in read_jsonl(path):
        if rec.get("_task_type") != "completion" or skipped_crate(rec["_source"]):
            continue
        norm = normalise_pair(rec["prompt"], rec["gen"])
        if norm is None or not is_utf8(norm[0] + norm[1]) or norm[0] in seen:
            continue
        seen.add(norm[0])
        candidates.append((stable_key(seed, "pair", *norm), rec["_source"], *norm))
    candidates.sort()
    per: Counter[str] = Counter()
    out: list[dict[str, Any]] = []
    for _, crate, prompt, gen in candidates:
        if per[crate] >= per_crate:
            continue
        per[crate] += 1
        split = "val" if len(out) % val_every == val_every - 1 else "train"
        out.append({"prompt": prompt, "gen": gen, "_source": SOURCE, "_split": split,
                    "_task_type": "completion"})
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"only {len(out)} usable pairs in {path}, wanted {n}")
    return out


# ---------------------------------------------------------------------------------------------- files


def file_kind(path: str, content: str) -> str:
    """Which default filter (if any) a code file trips: test, bench, example or plain."""
    dirs = path_dirs(path)
    if dirs & {"target", "node_modules", "vendor", "__pycache__"} or path.endswith("Cargo.lock"):
        return "vendor"
    if dirs & {"test", "tests"}:
        return "test_dir"
    if "#[cfg(test)]" in content:
        return "cfg_test"
    if dirs & {"bench", "benches"} or "#[cfg(bench)]" in content:
        return "bench"
    if dirs & {"example", "examples"}:
        return "example"
    return "plain"


# How many code files of each kind: 49 pass the default filters (2 of them examples, which pass unless
# exclude_examples), 11 are dropped (test_file 8, bench_file 3).
FILE_QUOTAS = {"plain": 47, "example": 2, "test_dir": 4, "cfg_test": 4, "bench": 3}


def select_files(path: Path, seed: int, quotas: dict[str, int] | None = None, min_bytes: int = 1000,
                 max_bytes: int = 8000, per_crate: int = 2) -> list[dict[str, str]]:
    """Code-file records of min_bytes..max_bytes from code.jsonl, by kind quotas, at most per_crate each."""
    quotas = dict(FILE_QUOTAS if quotas is None else quotas)
    candidates: list[tuple[str, str, str, str]] = []
    for rec in read_jsonl(path):
        content, rel = rec["content"], rec["path"]
        size = len(content.encode("utf-8", "surrogatepass"))
        if not min_bytes <= size <= max_bytes or skipped_crate(rel) or not is_utf8(content):
            continue
        kind = file_kind(rel, content)
        if kind in quotas:
            candidates.append((stable_key(seed, "file", rel), kind, rel, content))
    candidates.sort()
    per: Counter[tuple[str, str]] = Counter()
    chosen: list[tuple[str, str, str]] = []
    for _, kind, rel, content in candidates:
        crate = rel.split("/")[0]
        if quotas[kind] == 0 or per[kind, crate] >= per_crate:
            continue
        quotas[kind] -= 1
        per[kind, crate] += 1
        chosen.append((kind, rel, content))
    missing = {k: v for k, v in quotas.items() if v}
    if missing:
        raise SystemExit(f"not enough code files in {path} for {missing}")
    chosen.sort(key=lambda c: c[1])
    return [{"content": content, "path": rel} for _, rel, content in chosen]


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer_sample(path: Path, seed: int, target_bytes: int, max_file_bytes: int = 200_000) -> list[str]:
    """Rust files from code.jsonl in seeded order until target_bytes (generated giants skipped)."""
    keyed = []
    for rec in read_jsonl(path):
        content = rec["content"]
        if is_utf8(content) and len(content.encode()) <= max_file_bytes:
            keyed.append((stable_key(seed, "tok", rec["path"]), content))
    keyed.sort()
    out, total = [], 0
    for _, content in keyed:
        if total >= target_bytes:
            break
        out.append(content)
        total += len(content.encode())
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE with <|endoftext|> as id 0 and all 256 byte symbols in the base vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json, written by hand so transformers 4.45+ and 5.x both load it."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            "0": {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": True},
        },
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(tok: Any, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("chat_template.jinja", "vocab.json", "merges.txt"):
        (out_dir / stale).unlink(missing_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    write_json(out_dir / "tokenizer_config.json", tokenizer_config())
    write_json(out_dir / "special_tokens_map.json", {"eos_token": EOS, "pad_token": EOS})


def dump_line(rec: dict[str, Any]) -> str:
    """One JSONL line, UTF-8 kept readable but with the separators str.splitlines() would cut escaped."""
    line = json.dumps(rec, ensure_ascii=False)
    for ch in ("\x85", "\u2028", "\u2029"):  # json.dumps leaves these raw; control chars < 0x20 are escaped
        line = line.replace(ch, f"\\u{ord(ch):04x}")
    return line + "\n"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- check


def training_text(rec: dict[str, Any]) -> str:
    if "prompt" in rec:
        return f"{rec['prompt']}\n\n{rec['gen']}"
    return str(rec["content"])


def verify(out_dir: Path) -> dict[str, Any]:
    """Load data and tokenizer the way the server does (offline) and check the contract; return stats."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    data, tok_dir = out_dir / "default.jsonl", out_dir / "tokenizer"
    problems: list[str] = []
    raw = data.read_bytes()
    lines = raw.decode("utf-8").split("\n")
    if lines.pop() != "" or len(lines) != len(raw.decode("utf-8").splitlines()):
        problems.append("default.jsonl: missing final newline or a line break inside a record")
    records = [json.loads(line) for line in lines]
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    if not tok.is_fast:
        problems.append("tokenizer is not fast")
    if tok.eos_token != EOS or tok.eos_token_id != 0 or tok.pad_token is None:
        problems.append(f"eos/pad wrong: {tok.eos_token!r} {tok.eos_token_id} {tok.pad_token!r}")
    turns = [{"role": "user", "content": "fn f() {"}, {"role": "assistant", "content": "    1\n}"}]
    chat = str(tok.apply_chat_template(turns, tokenize=False))
    head = str(tok.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True))
    if chat != "<|user|>\nfn f() {\n<|assistant|>\n    1\n}\n" or not chat.startswith(head):
        problems.append(f"chat template renders {chat!r} / {head!r}")
    n_tokens = n_bytes = 0
    kinds: Counter[str] = Counter()
    for i, rec in enumerate(records, 1):
        text = training_text(rec)
        kinds["pair:" + rec["_split"] if "prompt" in rec else "file:" + file_kind(rec["path"], text)] += 1
        for part in (text, *(v for k, v in rec.items() if k in ("prompt", "gen"))):
            ids = tok(part, add_special_tokens=False).input_ids
            if tok.decode(ids) != part:
                problems.append(f"line {i}: decode(encode(text)) != text")
        n_tokens += len(tok(text, add_special_tokens=False).input_ids)
        n_bytes += len(text.encode())
    if problems:
        raise SystemExit("verification failed:\n  " + "\n  ".join(problems[:20]))
    return {
        "records": len(records), "kinds": dict(sorted(kinds.items())), "vocab_size": len(tok),
        "bytes_per_token": round(n_bytes / n_tokens, 3), "tokens": n_tokens,
        "sizes": {str(p.relative_to(out_dir)): p.stat().st_size
                  for p in sorted([data, *tok_dir.iterdir()]) if p.is_file()},
    }


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus", type=Path, default=Path(os.environ.get("SIGIL_FEED_CORPUS", "/work/corpus")),
                    help="make-rust-corpus output directory (code.jsonl, pairs.jsonl); "
                         "default $SIGIL_FEED_CORPUS or /work/corpus")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (server/default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tokenizer-mb", type=float, default=16.0, help="MB of Rust to train the tokenizer on")
    ap.add_argument("--skip-tokenizer", action="store_true", help="keep the existing tokenizer")
    ap.add_argument("--check", action="store_true", help="only verify the files already in --out")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if not args.check:
        code, pairs = args.corpus / "code.jsonl", args.corpus / "pairs.jsonl"
        for p in (code, pairs):
            if not p.is_file():
                raise SystemExit(f"{p} missing: run /work/shared/tools/make-rust-corpus {args.corpus} first")
        out.mkdir(parents=True, exist_ok=True)
        records: list[dict[str, Any]] = [*select_pairs(pairs, args.pairs, args.seed),
                                         *select_files(code, args.seed)]
        with (out / "default.jsonl").open("w", encoding="utf-8", newline="\n") as fh:
            for rec in records:
                fh.write(dump_line(rec))
        print(f"wrote {len(records)} records to {out / 'default.jsonl'}")
        if not args.skip_tokenizer:
            texts = tokenizer_sample(code, args.seed, int(args.tokenizer_mb * 1e6))
            mb = sum(len(t.encode()) for t in texts) / 1e6
            print(f"training byte-level BPE (vocab {args.vocab_size}) on {len(texts)} files, {mb:.1f} MB")
            write_tokenizer(train_tokenizer(texts, args.vocab_size), out / "tokenizer")
    stats = verify(out)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
