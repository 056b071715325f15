"""The embedded default: Rust dataset and tokenizer built by scripts/make_default_dataset.py."""

from pathlib import Path

DEFAULT_DIR: Path = Path(__file__).resolve().parent
DEFAULT_DATA: Path = DEFAULT_DIR / "default.jsonl"
DEFAULT_TOKENIZER: Path = DEFAULT_DIR / "tokenizer"

__all__ = ["DEFAULT_DATA", "DEFAULT_DIR", "DEFAULT_TOKENIZER"]
