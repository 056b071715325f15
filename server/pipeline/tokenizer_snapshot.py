"""The tokenizer as transformers builds it, saved once and loaded again without importing transformers.

`AutoTokenizer` is the reference for ids, but importing transformers (and, through it, torch) costs a server
start seconds. What encoding needs of it is the Rust `tokenizers.Tokenizer` transformers configures (its
`backend_tokenizer`: added tokens, prefix spaces and post-processing as the tokenizer class sets them) and a few
facts (EOS and padding ids, the vocabulary size, the added tokens). The first load of a tokenizer writes both to
`<cache>/tokenizers/`, keyed by the tokenizer files' fingerprint and the transformers version; later loads read
them back with `tokenizers` alone, so the ids are those of the very backend transformers built. A damaged or
missing snapshot is made again from transformers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class TokenizerFacts:
    """What the server needs of a tokenizer besides its Rust backend."""

    eos_id: int | None
    pad_id: int | None
    vocab_size: int  # ids, added tokens included (`len(tokenizer)`)
    added: list[str]  # the added tokens' text


@dataclass(frozen=True)
class TokenizerSnapshot:
    """The Rust tokenizer transformers built, and its facts."""

    backend: Tokenizer
    facts: TokenizerFacts

    @classmethod
    def of(cls, tokenizer: Any) -> TokenizerSnapshot:
        """The snapshot of a loaded transformers tokenizer."""
        return cls(tokenizer.backend_tokenizer, TokenizerFacts(
            tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer),
            [token.content for token in tokenizer.added_tokens_decoder.values()]))


def snapshot_path(folder: Path, fingerprint: str) -> Path:
    """Where the snapshot of the tokenizer with files `fingerprint` is kept for this transformers version."""
    try:
        made_by = version("transformers")
    except PackageNotFoundError:
        made_by = "none"
    return folder / "tokenizers" / f"{fingerprint}-transformers-{made_by}.json"


def read_snapshot(path: Path) -> TokenizerSnapshot | None:
    """The snapshot at `path`, or None when there is none or it is damaged (logged)."""
    try:
        body = json.loads(path.read_text())
        if body.get("format") != FORMAT:
            return None
        return TokenizerSnapshot(Tokenizer.from_str(body["backend"]), TokenizerFacts(**body["facts"]))
    except FileNotFoundError:
        return None
    except Exception as err:  # json, a missing key, or tokenizers refusing the definition
        log.warning("tokenizer snapshot %s is damaged (%s: %s); loading the tokenizer with transformers again",
                    path, type(err).__name__, err)
        return None


def write_snapshot(path: Path, snapshot: TokenizerSnapshot) -> None:
    """Save `snapshot` at `path` as one whole file (a reader sees the old file, none, or this one); a folder that
    cannot be written only costs the next start its transformers import (logged)."""
    body = {"format": FORMAT, "backend": snapshot.backend.to_str(), "facts": asdict(snapshot.facts)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name + ".tmp-", delete=False) as f:
            f.write(json.dumps(body))
        os.replace(f.name, path)
    except OSError as err:
        log.info("tokenizer snapshot not saved at %s (%s); the next start loads transformers again", path, err)
