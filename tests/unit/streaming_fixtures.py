"""What the through-Feed property tests share: the bundled tokenizer loaded once, and small encode chunks."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest

from sigil_feed.server.pipeline.tokenize import Encoder
from sigil_feed.server.streaming import encoding as blocks
from tests.conftest import TOKENIZER_DIR


@cache
def encoder() -> Encoder:
    """The bundled tokenizer, loaded once per test process."""
    return Encoder(str(TOKENIZER_DIR))


@pytest.fixture(autouse=True, scope="module")
def small_tokenize_chunks() -> Iterator[None]:
    """Streaming mode encodes in chunks of 3 samples, so that every property crosses chunk and block boundaries."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blocks, "TOKENIZE_CHUNK", 3)
        yield
