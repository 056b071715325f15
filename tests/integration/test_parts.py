"""Big batches in Parts: a client that accepts them gets each big response as Parts that join into exactly the
message an old client (its Open without `accept_parts`) gets whole, and the real client reads them, resuming
exactly when the server is killed while a batch's Parts are on their way."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from sigil_feed.client import BatchStream, FeedBatch, parts
from sigil_feed.client.decode import decode_batch
from sigil_feed.client.parts import Part, read_response, whole
from sigil_feed.protos import feed_pb2
from sigil_feed.server.rpc.wire import CHUNK
from tests.conftest import ServerProcess, rust_pair, write_config, write_jsonl
from tests.integration.conftest import open_request

BATCH, SEQ_LEN = 256, 4096  # 2 MiB of uint16 ids: three Parts
STREAM = "/sigil_feed.v1.DataFeed/Stream"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small streaming corpus of padded rows (a sample each) at seq_len 4096, reshuffled each epoch: each epoch
    is one batch, made from its BATCH samples alone (packed rows would wrap the short epoch hundreds of times)."""
    folder = tmp_path_factory.mktemp("parts")
    write_jsonl(folder / "pairs.jsonl", [rust_pair(i) for i in range(BATCH)])
    return write_config(folder / "trainer.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False,
                                                  "shuffle_seed": 3}, max_seq_len=SEQ_LEN, pack=False)


@pytest.fixture(scope="module")
def server(module_server: Callable[..., ServerProcess], config: Path) -> ServerProcess:
    """One server for the module's read-only tests."""
    return module_server(config)


def raw_messages(target: str, batches: int, **open_fields: bool) -> list[bytes]:
    """Every message of a stream granted `batches` batches (then half-closed), as the bytes sent."""
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        call = channel.stream_stream(STREAM, request_serializer=feed_pb2.StreamRequest.SerializeToString)
        requests = [open_request(batch_size=BATCH, seq_len=SEQ_LEN, credits=batches, **open_fields)]
        return list(call(iter(requests), timeout=60))


def batches_of(responses: Iterator[feed_pb2.StreamResponse]) -> list[feed_pb2.StreamResponse]:
    """The batch responses among these."""
    return [r for r in responses if r.WhichOneof("kind") == "batch"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def kind(message: bytes) -> str | None:
    return feed_pb2.StreamResponse.FromString(message).WhichOneof("kind")


def test_a_big_batch_comes_in_parts_that_join_into_the_whole_message(server: ServerProcess) -> None:
    old = raw_messages(server.target, 2)
    parted = raw_messages(server.target, 2, accept_parts=True)
    old_kinds = [kind(m) for m in old]  # an Open without accept_parts: whole messages, as before
    assert old_kinds.count("batch") == 2 and "part" not in old_kinds
    assert all(len(m) > 2 * CHUNK for m, k in zip(old, old_kinds, strict=True) if k == "batch")
    parts = [feed_pb2.StreamResponse.FromString(m).part for m in parted if kind(m) == "part"]
    assert "batch" not in map(kind, parted) and len(parts) >= 6
    assert all(0 < len(p.data) <= CHUNK for p in parts) and [p.last for p in parts].count(True) == 2
    joined = list(whole(map(read_response, parted), None))
    assert [sha(r.SerializeToString()) for r in joined] == [sha(m) for m in old]


def first_batches(stream: BatchStream, count: int) -> list[FeedBatch]:
    """The stream's first `count` batches (epoch ends skipped)."""
    items = (item for item in stream if isinstance(item, FeedBatch))
    return [next(items) for _ in range(count)]


def test_the_client_reads_parts_into_the_batches_an_old_client_gets(server: ServerProcess) -> None:
    old = batches_of(feed_pb2.StreamResponse.FromString(m) for m in raw_messages(server.target, 3))
    with BatchStream(server.target, batch_size=BATCH, seq_len=SEQ_LEN, prefetch=1) as stream:
        got = first_batches(stream, 3)
    for response, item in zip(old, got, strict=True):
        assert item.cursor == response.batch.cursor
        expected = decode_batch(response.batch, pack=False)
        assert expected.keys() == item.arrays.keys()
        assert all(np.array_equal(item.arrays[k], expected[k]) for k in expected)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_server_killed_between_a_batchs_parts_loses_and_repeats_nothing(
        server: ServerProcess, start_server: Callable[..., ServerProcess], config: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server is SIGKILLed right after the client has read the first Part of the fourth batch (watched where
    the client reads each message, which still does the reading): the client drops that Part, resumes from
    the third batch's cursor and gets the fourth batch again, whole and once."""
    reference = batches_of(feed_pb2.StreamResponse.FromString(m) for m in raw_messages(server.target, 8))
    expected = [sha(decode_batch(r.batch, pack=False)["input_ids"].tobytes()) for r in reference]
    assert len(set(expected)) == 8  # a lost or repeated batch would show
    port = free_port()
    server = start_server(config, "--port", str(port))
    lasts, killed = [], threading.Event()

    def read_and_kill(raw: bytes) -> feed_pb2.StreamResponse | Part:
        message = read_response(raw)
        if isinstance(message, Part):
            lasts.append(message.last)
            if lasts.count(True) == 3 and not message.last and not killed.is_set():
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait()
                killed.set()
                threading.Timer(0.3, start_server, (config, "--port", str(port))).start()
        return message

    monkeypatch.setattr(parts, "read_response", read_and_kill)
    with BatchStream(f"127.0.0.1:{port}", batch_size=BATCH, seq_len=SEQ_LEN, prefetch=2,
                     reconnect_deadline_s=120) as stream:
        got = first_batches(stream, 8)
    assert killed.is_set()
    assert [sha(item.arrays["input_ids"].tobytes()) for item in got] == expected
