"""Every limit and every request field, and a fuzz test, against one real server with tight limits."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil_feed.client.stream import BatchStream, FeedBatch
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from sigil_feed.server.feed.cursor import TAG_BYTES, Cursor
from sigil_feed.server.streaming.packer import StreamState
from tests.conftest import ServerProcess
from tests.integration.conftest import feed_config, open_request, stream_status
from tests.integration.test_lifecycle import FreezingProxy
from tests.unit.test_cursor import body, signed

LIMITS = {"max_streams": 3, "max_credits": 4, "max_batch_size": 64, "max_seq_len": 4096, "max_message_mb": 1,
          "max_world_size": 16, "max_cursor_kb": 1}
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
EXPECTED_CODES = {grpc.StatusCode.OK, INVALID, NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.RESOURCE_EXHAUSTED}
"""Every answer the server may give to a client's input; never INTERNAL or UNKNOWN."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, module_server) -> ServerProcess:
    return module_server(feed_config(tmp_path_factory.mktemp("limits"), {"limits": LIMITS}))


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def credit(credits: int) -> feed_pb2.StreamRequest:
    return feed_pb2.StreamRequest(credit=feed_pb2.Credit(credits=credits))


BAD_STREAMS = [
    ([open_request(dataset="nope", batch_size=1)], NOT_FOUND, "open.dataset: dataset 'nope'"),
    ([open_request(dataset="x" * 300, batch_size=1)], INVALID, "open.dataset: longer than 256"),
    ([open_request(batch_size=0)], INVALID, "open.batch_size"),
    ([open_request(batch_size=65)], INVALID, "open.batch_size: 65 must be in 1..64"),
    ([open_request(batch_size=64, seq_len=4096)], INVALID, "open.batch_size: batch_size x seq_len exceeds the 1 MB"),
    ([open_request(batch_size=1, seq_len=4097)], INVALID, "open.seq_len"),
    ([open_request(batch_size=1, rank=2, world_size=2)], INVALID, "open.rank"),
    ([open_request(batch_size=1, rank=1)], INVALID, "open.rank: 1 must be < world_size 1"),
    ([open_request(batch_size=1, world_size=17)], INVALID, "open.world_size: 17 exceeds the limit 16"),
    ([open_request(batch_size=1, credits=5)], INVALID, "open.credits: 5 exceeds the limit 4"),
    ([open_request(batch_size=1, cursor=b"\x01" * 1025)], INVALID, "open.cursor: 1025 bytes exceeds"),
    ([open_request(batch_size=1, cursor=b"\x01garbage")], grpc.StatusCode.FAILED_PRECONDITION, "cursor"),
    ([open_request(batch_size=1, client_id="c" * 257)], INVALID, "open.client_id: longer than 256"),
    ([open_request(batch_size=1, client_id="a\nforged log line")], INVALID, "open.client_id: must be printable"),
    ([], INVALID, "open: the first message of a stream must be an Open"),
    ([credit(1)], INVALID, "open: the first message"),
    ([feed_pb2.StreamRequest()], INVALID, "open: the first message"),
    ([open_request(batch_size=1), open_request(batch_size=1)], INVALID, "credit: after Open"),
    ([open_request(batch_size=1, credits=1), credit(0)], INVALID, "credit.credits: must be >= 1"),
    ([open_request(batch_size=1), credit(5)], INVALID, "credit.credits: 5 would put more than 4"),
]


@pytest.mark.parametrize(("requests", "code", "message"), BAD_STREAMS,
                         ids=[m.split(":")[0] + f"-{i}" for i, (_, _, m) in enumerate(BAD_STREAMS)])
def test_bad_stream_requests_get_a_status_naming_the_field(channel: grpc.Channel, requests: list, code,
                                                           message: str) -> None:
    got, details, _ = stream_status(feed_pb2_grpc.DataFeedStub(channel), requests)
    assert got == code and message in details, (got, details)


def test_bad_unary_requests_and_undecodable_bytes_are_invalid_argument(channel: grpc.Channel) -> None:
    stub = feed_pb2_grpc.DataFeedStub(channel)
    for request, code, message in [(feed_pb2.GetStatsRequest(dataset="nope"), NOT_FOUND, "dataset: dataset 'nope'"),
                                   (feed_pb2.GetStatsRequest(dataset="y" * 300), INVALID, "dataset: longer")]:
        with pytest.raises(grpc.RpcError) as err:
            stub.GetStats(request, timeout=10)
        assert err.value.code() == code and message in err.value.details()
    for method in ("GetStats", "ListDatasets"):
        raw = channel.unary_unary(f"/sigil_feed.v1.DataFeed/{method}")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == INVALID and "request: not a valid protobuf message" in err.value.details()
    raw_stream = channel.stream_stream("/sigil_feed.v1.DataFeed/Stream")
    with pytest.raises(grpc.RpcError) as err:
        list(raw_stream(iter([b"\x0a\x05\x08"]), timeout=10))
    assert err.value.code() == INVALID and "request: not a valid" in err.value.details()


def test_a_request_larger_than_the_message_limit_is_refused(channel: grpc.Channel) -> None:
    code, details, _ = stream_status(feed_pb2_grpc.DataFeedStub(channel),
                                     [open_request(batch_size=1, cursor=b"\x01" * (40 << 10))])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


class HeldStream:
    """A stream kept open with zero credits (or, `silent`, without ever sending Open) until closed."""

    def __init__(self, stub: feed_pb2_grpc.DataFeedStub, silent: bool = False) -> None:
        self.requests: queue.SimpleQueue[feed_pb2.StreamRequest | None] = queue.SimpleQueue()
        if not silent:
            self.requests.put(open_request(batch_size=1, credits=0))
        self.call = stub.Stream(iter(self.requests.get, None), timeout=60)

    def first(self) -> feed_pb2.StreamResponse | grpc.StatusCode:
        """The first answer, or the status that ended the stream."""
        try:
            return next(self.call)
        except grpc.RpcError as err:
            return err.code()

    def status(self) -> tuple[grpc.StatusCode, str]:
        """The status that ends the stream, skipping its answers."""
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""

    def close(self) -> None:
        self.call.cancel()


def open_clients(stub: feed_pb2_grpc.DataFeedStub) -> int:
    return len(stub.GetStats(feed_pb2.GetStatsRequest(), timeout=10).datasets[0].clients)


def test_streams_beyond_max_streams_are_resource_exhausted(channel: grpc.Channel) -> None:
    stub = feed_pb2_grpc.DataFeedStub(channel)
    held = [HeldStream(stub) for _ in range(3)]
    assert all(h.first().HasField("opened") for h in held)  # type: ignore[union-attr]
    extra = HeldStream(stub)
    assert extra.first() == grpc.StatusCode.RESOURCE_EXHAUSTED
    held.pop().close()
    deadline = time.monotonic() + 10
    while open_clients(stub) > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    again = HeldStream(stub)
    assert again.first().HasField("opened")  # type: ignore[union-attr]
    for h in [*held, again]:
        h.close()


class WellBehavedClient(threading.Thread):
    """Streams with the real client until stopped, counting batches; keeps any error."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target, self.batches = target, 0
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with BatchStream(self.target, batch_size=2, prefetch=2, client_id="good") as stream:
                for item in stream:
                    self.batches += isinstance(item, FeedBatch)
                    if self.stop.is_set():
                        return
                    time.sleep(0.005)
        except Exception as err:
            self.error = err


UINT32 = st.one_of(st.integers(0, 70), st.sampled_from([255, 1024, 4096, 4097, 2**31, 2**32 - 1]),
                   st.integers(0, 2**32 - 1))
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=300)
OPENS = st.builds(feed_pb2.Open, dataset=st.one_of(st.sampled_from(["", "default", "nope"]), TEXT),
                  rank=UINT32, world_size=UINT32, batch_size=UINT32, seq_len=UINT32,
                  cursor=st.one_of(st.just(b""), st.binary(max_size=1100)), credits=st.integers(0, 6), client_id=TEXT)
REQUESTS = st.one_of(OPENS.map(lambda o: feed_pb2.StreamRequest(open=o)),
                     st.builds(feed_pb2.Credit, credits=UINT32).map(lambda c: feed_pb2.StreamRequest(credit=c)),
                     st.just(feed_pb2.StreamRequest()))
VALID_OPENS = st.builds(feed_pb2.Open, batch_size=st.integers(1, 4), seq_len=st.sampled_from([0, 16, 64]),
                        credits=st.integers(0, 4)).map(lambda o: feed_pb2.StreamRequest(open=o))
SEQUENCES = st.one_of(st.lists(REQUESTS, max_size=4), st.tuples(VALID_OPENS, st.lists(REQUESTS, max_size=3)).map(
    lambda t: [t[0], *t[1]]))


def forged_cursors(stub: feed_pb2_grpc.DataFeedStub) -> list[bytes]:
    """Cursors for this server's dataset that decompress, parse and carry a valid signature (the server has no
    cursor secret) but hold a wrong state, plus ones with a bad signature."""
    fp = stub.ListDatasets(feed_pb2.ListDatasetsRequest(), timeout=10).datasets[0].fingerprint
    child = {"at": {"file": 0, "row": 0}, "skip": 0}
    mix = {"turn": 0, "exhausted": [False], "done": False, "children": [child]}
    packer = {"row": 0, "at": {"block": 0, "start": mix, "taken": 0}, "offset": 0, "wraps": 0}
    bodies = [{**b, "fp": fp} for b in (body(state={"row": "abc"}), body(state={}), body(state=[1, 2]),
                                        body(epoch=-1), body(epoch=2**40), body(state={"row": 0, "virtual": -1e9}),
                                        body(state=None, seq_len=0))]
    bodies += [{}, [1, 2], {"fp": fp}]
    states = [{"row": 3, "virtual": 1},  # a cached state, for this streaming dataset
              {**packer, "at": {**packer["at"], "start": {**mix, "exhausted": [False] * 2, "children": [child] * 2}}},
              {**packer, "at": {**packer["at"], "start": {**mix, "turn": -1}}}]
    good = Cursor(fp, 0, 64, StreamState.model_validate(packer))
    return ([signed(b) for b in bodies] + [signed(body(fp=fp, seq_len=seq_len, state=s)) for s in states
                                           for seq_len in (16, 64)]
            + [good.encode()[:1] + bytes(TAG_BYTES) + good.encode()[1 + TAG_BYTES:], good.encode(b"guess")])


def test_fuzzed_requests_and_garbage_bytes_get_a_status_while_a_good_client_streams(server: ServerProcess,
                                                                                    channel: grpc.Channel) -> None:
    good = WellBehavedClient(server.target)
    good.start()
    stub = feed_pb2_grpc.DataFeedStub(channel)
    raw_stream = channel.stream_stream("/sigil_feed.v1.DataFeed/Stream")
    raw_unary = {m: channel.unary_unary(f"/sigil_feed.v1.DataFeed/{m}") for m in ("GetStats", "ListDatasets")}
    deadline = time.monotonic() + 30
    while good.batches == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = good.batches

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(SEQUENCES)
    def messages(requests: list[feed_pb2.StreamRequest]) -> None:
        code, details, responses = stream_status(stub, requests)
        assert code in EXPECTED_CODES, (code, details)
        granted = sum(r.open.credits if r.HasField("open") else r.credit.credits for r in requests)
        assert sum(r.HasField("batch") for r in responses) <= granted

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.binary(max_size=200), max_size=4), st.sampled_from(["Stream", "GetStats", "ListDatasets"]))
    def garbage(payloads: list[bytes], method: str) -> None:
        try:
            if method == "Stream":
                list(raw_stream(iter(payloads), timeout=20))
            else:
                raw_unary[method](payloads[0] if payloads else b"", timeout=20)
        except grpc.RpcError as err:
            assert err.code() in EXPECTED_CODES, (err.code(), err.details())

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.sampled_from(forged_cursors(stub)), VALID_OPENS)
    def forged(cursor: bytes, request: feed_pb2.StreamRequest) -> None:
        request.open.cursor = cursor
        code, details, _ = stream_status(stub, [request])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("cursor: "), (code, details)
        assert "Error" not in details, details  # plain words, no Python exception text

    messages()
    garbage()
    forged()
    during = good.batches
    good.stop.set()
    good.join(30)
    assert good.error is None and during > before, (good.error, before, during)


GUARDED = {"max_streams": 4, "max_streams_per_peer": 2, "open_timeout_s": 1, "idle_timeout_s": 2}
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, module_server) -> ServerProcess:
    """A server with short Open and idle timeouts and room for two streams per client address."""
    return module_server(feed_config(tmp_path_factory.mktemp("guarded"), {"limits": GUARDED}))


@pytest.fixture
def second_host(guarded: ServerProcess) -> Iterator[grpc.Channel]:
    """A channel to the server whose connections come from 127.0.0.2, another client address."""
    proxy = FreezingProxy(guarded.target, source="127.0.0.2")
    try:
        with grpc.insecure_channel(proxy.target) as channel:
            yield channel
    finally:
        proxy.close()


def test_streams_that_never_send_open_are_counted_and_timed_out(guarded: ServerProcess) -> None:
    with grpc.insecure_channel(guarded.target) as channel:
        stub = feed_pb2_grpc.DataFeedStub(channel)
        silent = [HeldStream(stub, silent=True) for _ in range(2)]
        time.sleep(0.3)
        assert HeldStream(stub).first() == EXHAUSTED  # the silent streams hold this address's two places
        for s in silent:
            code, details = s.status()
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no Open message within 1 s" in details
        assert HeldStream(stub).first().HasField("opened")  # type: ignore[union-attr]


def test_streams_are_capped_per_client_address_and_in_total(guarded: ServerProcess, second_host: grpc.Channel) -> None:
    with grpc.insecure_channel(guarded.target) as channel:
        here, there = feed_pb2_grpc.DataFeedStub(channel), feed_pb2_grpc.DataFeedStub(second_host)
        held = [HeldStream(here, silent=True) for _ in range(2)]
        time.sleep(0.3)
        code, details, _ = stream_status(here, [open_request(batch_size=1)])
        assert code == EXHAUSTED and "from 127.0.0.1 (server.limits.max_streams_per_peer)" in details
        held += [HeldStream(there, silent=True) for _ in range(2)]  # another address still gets in
        time.sleep(0.3)
        code, details, _ = stream_status(there, [open_request(batch_size=1)])
        assert code == EXHAUSTED and "4 streams already open (server.limits.max_streams)" in details
        for h in held:
            h.close()


def test_a_stream_granting_no_credit_is_ended_after_the_idle_timeout(guarded: ServerProcess) -> None:
    with grpc.insecure_channel(guarded.target) as channel:
        idle = HeldStream(feed_pb2_grpc.DataFeedStub(channel))
        assert idle.first().HasField("opened")  # type: ignore[union-attr]
        code, details = idle.status()
    assert code == grpc.StatusCode.UNAVAILABLE and "no credit granted for 2 s" in details
    assert read_batches(guarded.target, pause_s=2.5) == read_batches(guarded.target, pause_s=0)


def read_batches(target: str, pause_s: float) -> list[list[int]]:
    """The first three batches' token ids, pausing after the first (a trainer that stops reading for a while)."""
    out = []
    with BatchStream(target, batch_size=2, prefetch=1) as stream:
        for item in stream:
            if isinstance(item, FeedBatch):
                out.append(item.arrays["input_ids"].ravel().tolist())
                if len(out) == 1:
                    time.sleep(pause_s)  # long enough for the server to close the idle stream; the client resumes
                if len(out) == 3:
                    return out
    return out
