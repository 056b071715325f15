"""BatchStream and FeedDataset against a fake DataFeed servicer on a real gRPC server (a test double)."""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from sigil_feed.client import BatchStream, EpochEnd, FeedBatch, FeedConnectionError, FeedError, FeedServerError
from sigil_feed.client.position import batch_state, decode_cursor
from sigil_feed.protos import feed_pb2, feed_pb2_grpc

SEQ_LEN = 4


def make_batch(index: int, epoch: int) -> feed_pb2.Batch:
    """A 1x4 packed batch whose tokens all equal `index`; its cursor is the next index."""
    def tensor(name: str, array: np.ndarray) -> feed_pb2.Tensor:
        return feed_pb2.Tensor(name=name, dtype=array.dtype.str, shape=array.shape, data=array.tobytes())

    tensors = [tensor("input_ids", np.full((1, SEQ_LEN), index, dtype="<u2")),
               tensor("segment_lengths", np.array([SEQ_LEN], dtype="<i4")),
               tensor("row_segments", np.array([1], dtype="<i4"))]
    return feed_pb2.Batch(seq=index, epoch=epoch, tensors=tensors, cursor=str(index + 1).encode(),
                          tokens=SEQ_LEN)


class FakeFeed(feed_pb2_grpc.DataFeedServicer):
    """Serves numbered batches over `epochs` epochs, honouring credits; can fail once at a given index (after the
    first of its Parts when it sends batches as Parts of `part_bytes` to clients that accept them)."""

    def __init__(self, per_epoch: int = 5, epochs: int = 2, fail_at: int | None = None,
                 fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, part_bytes: int = 0) -> None:
        self.per_epoch, self.total = per_epoch, per_epoch * epochs
        self.fail_at, self.fail_code, self.part_bytes = fail_at, fail_code, part_bytes
        self.opens: list[feed_pb2.Open] = []
        self.granted = self.sent = 0
        self.lock = threading.Lock()

    def Stream(self, request_iterator: Iterator[feed_pb2.StreamRequest],
               context: grpc.ServicerContext) -> Iterator[feed_pb2.StreamResponse]:
        """Open, then one batch per credit, an EpochEnd after each epoch, then complete."""
        opening = next(request_iterator).open
        self.opens.append(opening)
        if opening.dataset != "default":
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown dataset {opening.dataset!r}")
        info = feed_pb2.DatasetInfo(name="default", pack=True, fingerprint="fp", vocab_size=65536,
                                    mode="streaming")
        yield feed_pb2.StreamResponse(opened=feed_pb2.Opened(dataset=info, seq_len=SEQ_LEN))
        credits = self._grant(opening.credits)
        index = int(opening.cursor or b"0")
        while index < self.total:
            while credits == 0:
                request = next(request_iterator, None)
                if request is None:
                    return
                credits = self._grant(request.credit.credits)
            responses = self._responses(make_batch(index, index // self.per_epoch), opening.accept_parts)
            if index == self.fail_at:
                self.fail_at = None
                yield from responses[:-1][:1]  # the first Part, if in Parts
                context.abort(self.fail_code, f"injected failure at batch {index}")
            yield from responses
            credits, index = credits - 1, index + 1
            with self.lock:
                self.sent += 1
            if index % self.per_epoch == 0:
                end = feed_pb2.EpochEnd(epoch=index // self.per_epoch - 1, cursor=str(index).encode())
                yield feed_pb2.StreamResponse(epoch_end=end)

    def _responses(self, batch: feed_pb2.Batch, parts: bool) -> list[feed_pb2.StreamResponse]:
        """The batch's response, whole or as Parts."""
        if not (parts and self.part_bytes):
            return [feed_pb2.StreamResponse(batch=batch)]
        data, size = feed_pb2.StreamResponse(batch=batch).SerializeToString(), self.part_bytes
        return [feed_pb2.StreamResponse(part=feed_pb2.Part(data=data[i:i + size], last=i + size >= len(data)))
                for i in range(0, len(data), size)]

    def _grant(self, credits: int) -> int:
        """Record credits granted by the client."""
        with self.lock:
            self.granted += credits
        return credits


class RefusingFeed(FakeFeed):
    """A FakeFeed that answers the Opens numbered in `refuse` (0 = the first) with UNAVAILABLE and a reason, as a
    server does while its token store builds or while it shuts down."""

    REASON = "dataset 'default': token store building (1,234 samples so far)"

    def __init__(self, refuse: range | set[int], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.refuse = refuse

    def Stream(self, request_iterator: Iterator[feed_pb2.StreamRequest],
               context: grpc.ServicerContext) -> Iterator[feed_pb2.StreamResponse]:
        if len(self.opens) in self.refuse:
            self.opens.append(next(request_iterator).open)
            context.abort(grpc.StatusCode.UNAVAILABLE, self.REASON)
        yield from super().Stream(request_iterator, context)


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[str, grpc.Server]]]:
    """Start a fake servicer on a real gRPC server (optionally on a given port); stop them all after."""
    servers: list[grpc.Server] = []

    def start(servicer: FakeFeed, port: int = 0) -> tuple[str, grpc.Server]:
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-server"))
        feed_pb2_grpc.add_DataFeedServicer_to_server(servicer, server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{bound}", server

    yield start
    for server in servers:
        server.stop(None)


def free_port() -> int:
    """A TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def index_of(item: FeedBatch | EpochEnd) -> int | str:
    """The batch number a fake batch carries, or a marker for an epoch end."""
    return int(item.arrays["input_ids"][0, 0]) if isinstance(item, FeedBatch) else f"end{item.epoch}"


def expected(fake: FakeFeed) -> list[int | str]:
    """Every item of the fake's full stream, in order."""
    items: list[int | str] = []
    for index in range(fake.total):
        items.append(index)
        if (index + 1) % fake.per_epoch == 0:
            items.append(f"end{index // fake.per_epoch}")
    return items


def settle(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Wait until predicate() holds or the timeout passes; return the last result."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_full_stream_in_order_then_stop(serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """Every batch and epoch marker arrives in order; completion ends iteration; cursor follows items."""
    fake = FakeFeed()
    target, _ = serve(fake)
    with BatchStream(target, batch_size=1, prefetch=3) as stream:
        assert stream.info.fingerprint == "fp" and stream.seq_len == SEQ_LEN
        items = list(stream)
        assert stream.cursor == str(fake.total).encode()
    assert [index_of(item) for item in items] == expected(fake)
    assert items[0].arrays["position_ids"].tolist() == [[0, 1, 2, 3]]
    assert fake.opens[0].credits == 3 and fake.opens[0].cursor == b""


@pytest.mark.parametrize("prefetch", [3, 4])
def test_credits_bound_what_the_server_sends(serve: Callable[..., tuple[str, grpc.Server]], prefetch: int) -> None:
    """(a) The server is never granted, and never sends, more than prefetch batches beyond those taken; the
    credits go back in chunks of prefetch // 2 (one Credit message per chunk)."""
    fake = FakeFeed(per_epoch=10, epochs=2)
    target, _ = serve(fake)
    chunk, taken = max(1, prefetch // 2), 0
    with BatchStream(target, batch_size=1, prefetch=prefetch) as stream:
        for step in range(12):
            want = prefetch + taken // chunk * chunk
            assert settle(lambda want=want: fake.sent == want), (step, fake.sent, taken)
            time.sleep(0.05)
            assert fake.granted == fake.sent == want
            taken += isinstance(next(stream), FeedBatch)


def test_reconnect_resumes_from_last_batch_received(serve: Callable[..., tuple[str, grpc.Server]],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """(b) UNAVAILABLE mid-stream: re-Open from the last batch received; no gap, no duplicate."""
    fake = FakeFeed(fail_at=7)
    target, _ = serve(fake)
    with caplog.at_level(logging.INFO), BatchStream(target, batch_size=1, prefetch=4) as stream:
        items = [index_of(item) for item in stream]
    assert items == expected(fake)
    assert [o.cursor for o in fake.opens] == [b"", b"7"]
    assert 1 <= fake.opens[1].credits <= 4
    # a reconnect that resumes at once loses nothing (a pause longer than the server's idle timeout): INFO only
    client = [r for r in caplog.records if r.name.startswith("sigil_feed.client")]
    assert any("reconnecting" in r.getMessage() and r.levelno == logging.INFO for r in client)
    assert any("resumed" in r.getMessage() and r.levelno == logging.INFO for r in client)
    assert [r.getMessage() for r in client if r.levelno >= logging.WARNING] == []


def test_a_reconnect_whose_attempts_fail_repeatedly_is_a_warning(serve: Callable[..., tuple[str, grpc.Server]],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The server breaks the stream, then refuses two re-Opens: WARNING while it fails and when it resumes."""
    fake = RefusingFeed({1, 2}, fail_at=3)
    target, _ = serve(fake)
    with caplog.at_level(logging.INFO), BatchStream(target, batch_size=1, prefetch=4) as stream:
        items = [index_of(item) for item in stream]
    assert items == expected(fake) and [o.cursor for o in fake.opens] == [b"", b"3", b"3", b"3"]
    warnings = [r.getMessage() for r in caplog.records
                if r.name.startswith("sigil_feed.client") and r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "2 attempts failed" in warnings[0] and RefusingFeed.REASON in warnings[0]
    assert "resumed" in warnings[1] and "3 attempt(s)" in warnings[1]


def test_a_batch_whose_parts_are_cut_off_comes_again_whole_after_the_reconnect(
        serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """The client asks for Parts and joins them; the Parts of a batch cut off by the break are dropped and the
    re-Open resumes at the last whole batch: no gap, no duplicate."""
    fake = FakeFeed(fail_at=7, part_bytes=16)
    target, _ = serve(fake)
    with BatchStream(target, batch_size=1, prefetch=4) as stream:
        items = [index_of(item) for item in stream]
    assert items == expected(fake)
    assert [(o.cursor, o.accept_parts) for o in fake.opens] == [(b"", True), (b"7", True)]


def test_reconnect_credits_count_the_buffered_batches(serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """(b) Batches buffered at the break stay valid: the re-Open grants only the room left in the buffer."""
    fake = FakeFeed(fail_at=6)
    target, _ = serve(fake)
    with BatchStream(target, batch_size=1, prefetch=4) as stream:
        # 4 taken: credits go back in chunks of prefetch/2, so the server got 4 + 4 and breaks at batch 6
        items = [index_of(next(stream)) for _ in range(4)]
        assert settle(lambda: len(fake.opens) == 2)
        assert (fake.opens[1].cursor, fake.opens[1].credits) == (b"6", 2)
        items += [index_of(item) for item in stream]
    assert items == expected(fake)


def test_reconnect_after_server_restart(serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """(b) The server process goes away and comes back on the same port; the stream carries on exactly."""
    fake = FakeFeed(per_epoch=6, epochs=2)
    target, server = serve(fake)
    port = int(target.rsplit(":", 1)[1])
    with BatchStream(target, batch_size=1, prefetch=2, reconnect_deadline_s=10) as stream:
        items = [index_of(next(stream)) for _ in range(3)]
        server.stop(None).wait()
        threading.Timer(0.3, serve, (fake, port)).start()
        items += [index_of(item) for item in stream]
    assert items == expected(fake)
    assert len(fake.opens) == 2 and fake.opens[1].cursor != b""


def test_reconnect_deadline_names_what_was_tried(serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """Past the reconnect deadline the consumer gets the buffered batches, then a descriptive error."""
    fake = FakeFeed(per_epoch=50, epochs=1)
    target, server = serve(fake)
    with BatchStream(target, batch_size=1, prefetch=2, reconnect_deadline_s=0.5) as stream:
        next(stream)
        server.stop(None).wait()
        start = time.monotonic()
        with pytest.raises(FeedConnectionError, match=r"could not resume.*attempt\(s\).*last error") as info:
            while True:
                next(stream)
        assert time.monotonic() - start < 5
        assert target in str(info.value)


def test_a_server_that_answers_unavailable_is_named_as_answering_not_as_unreachable(
        serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """Every Open answered UNAVAILABLE with a reason: past the deadline the error says the server answered, with
    its last status and message, and does not suggest the sidecar is down."""
    target, _ = serve(RefusingFeed(range(10**9)))
    with pytest.raises(FeedConnectionError) as info:
        BatchStream(target, batch_size=1, connect_deadline_s=0.5)
    message = str(info.value)
    assert target in message and "answered" in message and f"UNAVAILABLE: {RefusingFeed.REASON}" in message
    assert "is the sidecar running" not in message and "could not reach" not in message
    assert (info.value.code, info.value.details) == (grpc.StatusCode.UNAVAILABLE, RefusingFeed.REASON)


def test_a_reconnect_refused_until_the_deadline_names_the_servers_last_answer(
        serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """The stream breaks, then every re-Open is answered UNAVAILABLE (e.g. the server shuts down): the buffered
    batches, then an error quoting the server's answer, not a hint to start the sidecar."""
    fake = RefusingFeed(range(1, 10**9), fail_at=3)
    target, _ = serve(fake)
    with BatchStream(target, batch_size=1, prefetch=2, reconnect_deadline_s=0.5) as stream:
        assert [index_of(next(stream)) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(FeedConnectionError, match="answered but did not resume the stream") as info:
            next(stream)
    assert RefusingFeed.REASON in str(info.value) and "is the sidecar running" not in str(info.value)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_not_found_raises_immediately(serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """(c) A non-transient status on Open raises at once with the server's code and message."""
    target, _ = serve(FakeFeed())
    start = time.monotonic()
    with pytest.raises(FeedServerError, match="NOT_FOUND: unknown dataset 'nope'") as info:
        BatchStream(target, "nope", batch_size=1, connect_deadline_s=30)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert time.monotonic() - start < 2


def test_non_transient_error_mid_stream_is_not_retried(serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """(c) FAILED_PRECONDITION mid-stream: the batches before it, then the error; no reconnect."""
    fake = FakeFeed(fail_at=3, fail_code=grpc.StatusCode.FAILED_PRECONDITION)
    target, _ = serve(fake)
    with BatchStream(target, batch_size=1) as stream:
        assert [index_of(next(stream)) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(FeedServerError, match="FAILED_PRECONDITION"):
            next(stream)
        with pytest.raises(FeedServerError):
            next(stream)
    assert len(fake.opens) == 1


def test_unreachable_server_fails_fast_with_hint() -> None:
    """(d) Nothing listening: a clear error naming the target and `sigil-feed serve` after the deadline."""
    target = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(FeedConnectionError, match="sigil-feed serve") as info:
        BatchStream(target, batch_size=1, connect_deadline_s=0.5)
    assert target in str(info.value) and "could not reach" in str(info.value)
    assert time.monotonic() - start < 3
    assert (info.value.code, info.value.details) == (None, None)


def leftover_threads(before: set[threading.Thread]) -> set[str]:
    """Names of client threads started since `before` still running after a grace period."""
    def new() -> set[str]:
        return {t.name for t in set(threading.enumerate()) - before if not t.name.startswith("fake-server")}

    settle(lambda: not new(), timeout=3.0)
    return new()


def test_close_leaves_no_thread(serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """(e) close() mid-stream, or dropping the stream, stops every thread it started."""
    target, _ = serve(FakeFeed(per_epoch=100))
    before = set(threading.enumerate())
    stream = BatchStream(target, batch_size=1)
    next(stream)
    stream.close()
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)
    assert not leftover_threads(before)
    stream = BatchStream(target, batch_size=1)
    next(stream)
    del stream
    gc.collect()
    assert not leftover_threads(before)


def test_feed_dataset_state_dict_resumes_exactly(serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """FeedDataset through a DataLoader: state_dict after k batches resumes with batch k exactly."""
    torch = pytest.importorskip("torch")
    from sigil_feed.client import FeedDataset

    fake = FakeFeed(per_epoch=4, epochs=2)
    target, _ = serve(fake)
    before = set(threading.enumerate())
    dataset = FeedDataset(target, batch_size=1, rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None)
    seen = []
    for batch in loader:
        assert batch["input_ids"].dtype == torch.int64 and batch["labels"][0, 0] == -100
        seen.append(int(batch["input_ids"][0, 0]))
        if len(seen) == 5:
            break
    state = dataset.state_dict()
    assert decode_cursor(state["cursor"]) == b"5" and state["epoch"] == dataset.epoch == 1
    assert batch_state(batch) == state
    assert dataset.info.name == "default"
    del loader, batch
    gc.collect()
    assert not leftover_threads(before)
    resumed = FeedDataset(target, batch_size=1, rank=0, world_size=1)
    resumed.load_state_dict(state)
    seen += [int(b["input_ids"][0, 0]) for b in torch.utils.data.DataLoader(resumed, batch_size=None)]
    assert seen == list(range(fake.total))
    other = FeedDataset(target, batch_size=1, rank=1, world_size=2)  # a position is global: any layout loads it
    other.load_state_dict(state)
    assert other.state_dict() == {**state, "rank": 1, "world_size": 2}


def test_a_state_from_any_point_loads_with_default_torch_load(serve: Callable[..., tuple[str, grpc.Server]],
                                                               tmp_path: Path) -> None:
    """Before the first batch (empty cursor) and after one, the state loads with weights_only=True."""
    torch = pytest.importorskip("torch")
    from sigil_feed.client import FeedDataset

    target, _ = serve(FakeFeed(per_epoch=4, epochs=1))
    dataset = FeedDataset(target, batch_size=1, rank=0, world_size=1)
    for taken in (0, 1):
        if taken:
            first = next(iter(dataset))
            assert batch_state(first) == dataset.state_dict()
        torch.save({"data": dataset.state_dict()}, tmp_path / "state.pt")
        resumed = FeedDataset(target, batch_size=1, rank=0, world_size=1)
        resumed.load_state_dict(torch.load(tmp_path / "state.pt")["data"])
        assert [int(b["input_ids"][0, 0]) for b in resumed] == list(range(taken, 4))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_connected_feed_dataset_pickles_into_spawned_workers(serve: Callable[..., tuple[str, grpc.Server]],
                                                               method: str) -> None:
    """A FeedDataset that has connected (info set) goes to spawn/forkserver workers; the main copy then says
    that its position is in the workers instead of returning an empty one."""
    torch = pytest.importorskip("torch")
    from sigil_feed.client import FeedDataset

    target, _ = serve(FakeFeed(per_epoch=3, epochs=1))
    dataset = FeedDataset(target, batch_size=1, rank=0, world_size=1)
    assert dataset.fetch_info().name == "default"
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context=method)
    batches = list(loader)
    assert [int(b["input_ids"][0, 0]) for b in batches] == [0, 1, 2]
    assert decode_cursor(batch_state(batches[-1])["cursor"]) == b"3"
    with pytest.raises(FeedError, match="StatefulDataLoader"):
        dataset.state_dict()


def test_state_dict_refuses_when_forked_workers_hold_the_position(
        serve: Callable[..., tuple[str, grpc.Server]]) -> None:
    """DataLoader(num_workers=2) (fork): the main process never iterated, so it cannot know the position."""
    torch = pytest.importorskip("torch")
    from sigil_feed.client import FeedDataset

    target, _ = serve(FakeFeed(per_epoch=4, epochs=1))
    dataset = FeedDataset(target, batch_size=1, rank=0, world_size=1)
    assert dataset.state_dict()["cursor"] == ""  # nothing read anywhere yet: the start is known
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert list(loader)  # (the fake serves every stream in full, whatever its rank)
    with pytest.raises(FeedError, match="worker processes iterated this dataset"):
        dataset.state_dict()
