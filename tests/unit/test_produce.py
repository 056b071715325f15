"""Where a stream's batches are made: small cached batches on the event loop, big ones on a worker thread."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from sigil_feed.server.config import Limits
from sigil_feed.server.rpc.service import INLINE_TOKENS, DataFeedService


class Recorder:
    """A producer that records the thread and the count of each call."""

    def __init__(self, batch_size: int, seq_len: int, cached: bool) -> None:
        self.feed = SimpleNamespace(batch_size=batch_size, seq_len=seq_len, in_cached_epoch=cached)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, count: int) -> list:
        self.calls.append((threading.current_thread().name, count))
        return []


@pytest.mark.parametrize(("batch", "seq_len", "cached", "on_loop", "count"), [
    (8, 2048, True, True, 4),  # four 16 Ki-token batches fit the loop's budget of one call
    (16, 4096, True, True, 1),
    (1024, 32768, True, False, 4),  # big: a worker thread, however many
    (8, 2048, False, False, 4),  # streaming: always a worker thread
])
def test_only_small_cached_batches_are_cut_on_the_event_loop(batch: int, seq_len: int, cached: bool,
                                                               on_loop: bool, count: int) -> None:
    assert INLINE_TOKENS == 16 * 4096
    producer = Recorder(batch, seq_len, cached)
    with ThreadPoolExecutor(1, thread_name_prefix="feed") as executor:
        service = DataFeedService({}, Limits(), executor)

        async def produce() -> str:
            await service._produce(asyncio.get_running_loop(), producer, 4)  # type: ignore[arg-type]
            return threading.current_thread().name

        loop_thread = asyncio.run(produce())
    assert producer.calls == [(loop_thread if on_loop else "feed_0", count)]
