"""Graceful shutdown, stalled readers and vanished clients, against real servers."""

from __future__ import annotations

import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import ServerProcess, rust_pair, write_config, write_jsonl
from tests.integration.conftest import feed_config, open_request, stream_status
from tests.integration.test_observability import sample, scrape

BIG = {"batch_size": 100, "seq_len": 4096}
"""Padded rows: 100 x 4096 uint16 ids, about 800 KB a batch, so a few fill HTTP/2's flow-control windows."""
BIG_LIMITS = {"max_seq_len": 4096, "max_credits": 8}


def wait_for(condition: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class RawStream:
    """A Stream call whose requests the test feeds by hand and whose answers it reads only when it wants."""

    def __init__(self, channel: grpc.Channel, open_message: feed_pb2.StreamRequest) -> None:
        self.requests: queue.SimpleQueue[feed_pb2.StreamRequest | None] = queue.SimpleQueue()
        self.requests.put(open_message)
        self.call = feed_pb2_grpc.DataFeedStub(channel).Stream(iter(self.requests.get, None), timeout=120)

    def read_all(self) -> tuple[int, grpc.StatusCode, str]:
        """Batches read until the stream ends, and its status."""
        batches = 0
        try:
            for response in self.call:
                batches += response.HasField("batch")
        except grpc.RpcError as err:
            return batches, err.code(), err.details() or ""
        return batches, grpc.StatusCode.OK, ""


def clients(channel: grpc.Channel) -> list[feed_pb2.ClientStats]:
    stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=10)
    return list(stats.datasets[0].clients)


def test_sigterm_sends_every_granted_batch_then_exits_0(tmp_path: Path, start_server) -> None:
    grace = 30.0
    server = start_server(feed_config(tmp_path, {"limits": BIG_LIMITS, "grace_s": grace}, pairs=300, pack=False))
    with grpc.insecure_channel(server.target) as channel:
        stream = RawStream(channel, open_request(credits=8, **BIG))
        assert next(stream.call).HasField("opened")
        assert wait_for(lambda: any(c.batches for c in clients(channel)))
        time.sleep(0.5)
        sent_before = clients(channel)[0].batches
        assert sent_before < 8  # the client is not reading: flow control holds the rest on the server

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(channel)
        assert wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                        == health_pb2.HealthCheckResponse.NOT_SERVING)
        code, details, _ = stream_status(feed_pb2_grpc.DataFeedStub(channel), [open_request(batch_size=1)])
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        stream.requests.put(feed_pb2.StreamRequest(credit=feed_pb2.Credit(credits=4)))  # too late: not granted

        batches, code, details = stream.read_all()
    assert (batches, code) == (8, grpc.StatusCode.UNAVAILABLE) and "every granted batch was sent" in details
    assert server.proc.wait(grace) == 0
    assert time.monotonic() - signalled < grace / 2  # drained, not cut off by the grace period
    assert any("stream closed" in line and "batches=8" in line for line in server.output)


def rss_mb(server: ServerProcess) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def test_stalled_readers_cost_no_more_than_their_credits(tmp_path: Path, start_server) -> None:
    server = start_server(feed_config(tmp_path, {"limits": BIG_LIMITS}, pairs=300, pack=False))
    with grpc.insecure_channel(server.target) as channel:
        warm = RawStream(channel, open_request(credits=2, **BIG))
        warm.requests.put(None)
        assert warm.read_all()[0] == 2  # pipeline, tokenizer and buffers warmed up
        before = rss_mb(server)
        stalled = [RawStream(channel, open_request(credits=2, client_id=f"stalled-{i}", **BIG)) for i in range(6)]
        for s in stalled:
            assert next(s.call).HasField("opened")  # then never read again, never grant more
        assert wait_for(lambda: sorted(c.batches for c in clients(channel)) == [2] * 6)
        settled = rss_mb(server)
        time.sleep(4)
        after = rss_mb(server)
        assert sorted(c.batches for c in clients(channel)) == [2] * 6  # nothing produced beyond the credits
        assert all(c.credits == 0 for c in clients(channel))
        for s in stalled:
            s.call.cancel()
    print(f"server RSS: {before:.1f} MB before, {settled:.1f} MB with 6 stalled readers, {after:.1f} MB 4 s later")
    assert after - settled < 8, (before, settled, after)
    assert settled - before < 6 * 2 * 0.8 * 4 + 32, (before, settled, after)  # a few copies of each credited batch


class FreezingProxy:
    """A TCP relay that can go silent without closing anything, like a peer whose host vanished; it may connect from
    another loopback address, a second client host."""

    def __init__(self, upstream: str, source: str | None = None) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.source = None if source is None else (source, 0)  # the address it connects from
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream, source_address=self.source)
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._relay, args=(src, dst), daemon=True).start()

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            if self.frozen.is_set():
                time.sleep(0.05)
                continue
            try:
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(1 << 16)
                if not data:
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            s.close()


def test_a_vanished_client_is_dropped_by_keepalive_and_leaves_stats(tmp_path: Path, start_server) -> None:
    server = start_server(feed_config(tmp_path, {"keepalive": {"time_s": 1, "timeout_s": 1}}))
    proxy = FreezingProxy(server.target)
    try:
        with grpc.insecure_channel(proxy.target) as far, grpc.insecure_channel(server.target) as near:
            stream = RawStream(far, open_request(batch_size=2, credits=1, client_id="doomed"))
            assert next(stream.call).HasField("opened") and next(stream.call).HasField("batch")
            assert [c.client_id for c in clients(near)] == ["doomed"]
            proxy.frozen.set()
            vanished = time.monotonic()
            assert wait_for(lambda: not clients(near), timeout=20)
            print(f"vanished client dropped after {time.monotonic() - vanished:.1f} s")
            stream.call.cancel()
    finally:
        proxy.close()
    assert any("stream closed" in line and "rank=0 batches=1" in line for line in server.output)


def test_clients_cancelling_mid_batch_are_cancelled_not_internal_errors(tmp_path: Path, start_server) -> None:
    """Padded rows (a sample each), so each 4 MB batch is 256 of the 2,000 samples, not the short epoch wrapped
    many times. Eight clients at once, so the server paces these long writes (LoopShare): 16 MB batches spent most
    of the test waiting for their turns."""
    write_jsonl(tmp_path / "pairs.jsonl", [rust_pair(i) for i in range(2000)])
    config = write_config(tmp_path / "trainer.yaml", {"names": ["local:pairs.jsonl"], "cache_dir": str(tmp_path)},
                          pack=False, server={"limits": {"max_seq_len": 8192}})
    server = start_server(config, "--metrics-port", "0")
    cancels = 40

    def cancel_mid_batch(count: int) -> None:
        with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            for _ in range(count):
                call = feed_pb2_grpc.DataFeedStub(channel).Stream(
                    iter([open_request(batch_size=256, seq_len=8192, credits=8)]), timeout=60)
                assert next(call).HasField("opened") and next(call).HasField("batch")
                call.cancel()  # while the next 4 MB batches are on their way

    threads = [threading.Thread(target=cancel_mid_batch, args=(cancels // 8,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stream = "/sigil_feed.v1.DataFeed/Stream"
    assert wait_for(lambda: sum(v for (n, ls), v in scrape(server).items()
                                if n == "sigil_feed_rpcs_total" and ("method", stream) in ls) == cancels)
    metrics = scrape(server)
    codes = {dict(ls)["code"]: v for (n, ls), v in metrics.items() if n == "sigil_feed_rpcs_total"}
    assert "INTERNAL" not in codes and sample(metrics, "sigil_feed_rpcs_total", method=stream, code="CANCELLED") > 0
    log = "".join(server.output)
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("stream closed") == cancels
