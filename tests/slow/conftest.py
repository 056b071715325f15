"""Slow tests need the real Rust corpus from ../shared/tools/make-rust-corpus: set SIGIL_FEED_CORPUS to its folder.

Every test in this folder is marked `slow` (so `-m "not slow"` deselects them) and is skipped when the
variable is unset or the folder lacks the corpus files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CORPUS_ENV = "SIGIL_FEED_CORPUS"
CORPUS_FILES = ("code.jsonl", "code.parquet", "pairs.jsonl")
HERE = Path(__file__).resolve().parent


def corpus_dir() -> Path | None:
    """The corpus folder named by SIGIL_FEED_CORPUS, if it holds every corpus file."""
    value = os.environ.get(CORPUS_ENV)
    if not value:
        return None
    folder = Path(value).expanduser().resolve()
    return folder if all((folder / name).is_file() for name in CORPUS_FILES) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests slow, and skip them without a corpus."""
    folder = corpus_dir()
    why = (f"slow: set {CORPUS_ENV} to a folder made by ../shared/tools/make-rust-corpus "
           f"(holding {', '.join(CORPUS_FILES)})")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)
            if folder is None:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The corpus folder (the tests are skipped before this runs when there is none)."""
    folder = corpus_dir()
    assert folder is not None
    return folder
