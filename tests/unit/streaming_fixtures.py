"""What the streaming tests share: the bundled tokenizer loaded once, small encode chunks, mix positions."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest

from sigil_feed.server.pipeline.curate import CurateState
from sigil_feed.server.pipeline.mixing import MixState
from sigil_feed.server.pipeline.sources.base import SourceState
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


def mix_at(row: int) -> MixState:
    """A one-source mix's state at a row of its source (a block's start, for stand-ins of the read blocks)."""
    return MixState(turn=0, exhausted=[False], done=False, children=[CurateState(at=SourceState(file=0, row=row),
                                                                                  skip=0)])
