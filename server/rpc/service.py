"""The DataFeed servicer: validates requests, runs each stream's Feed in a worker thread, honours credits."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

import grpc

from ...protos import feed_pb2, feed_pb2_grpc
from ...protos.constants import WAIT_BUCKETS_S
from ..config import Limits
from ..errors import NotFound, RequestError, TimedOut, Unavailable, invalid
from ..feed.batches import Feed, FeedItem
from ..feed.cursor import decode_cursor
from ..feed.served import ServedDataset
from ..observe.streams import ClientStream, OpenStream, Streams
from ..observe.watch import InputBoundWatch
from .admission import Admission, LoopShare, Place, Stalled
from .credits import Credits
from .snapshot import snapshot
from .views import dataset_info
from .wire import PARTS_OVER, batch_response, messages

log = logging.getLogger(__name__)

MAX_TEXT = 256
"""Longest dataset name or client id a request may carry."""


MAX_AHEAD = 4  # most batches made in one worker-thread call
INLINE_TOKENS = 1 << 16
"""Most tokens cut on the event loop per turn (about 1 ms); bigger cached batches are cut on a worker thread,
so one client's big batches never stall the others' small ones."""

Produced = tuple[FeedItem | None, list[bytes] | None]
"""A feed item with its response's messages (see wire.messages); item None: the stream has ended."""


def _check_text(field: str, value: str) -> None:
    if len(value) > MAX_TEXT:
        raise invalid(field, f"longer than {MAX_TEXT} characters")
    if not value.isprintable():
        raise invalid(field, "must be printable text")


class DataFeedService(feed_pb2_grpc.DataFeedServicer):
    """Thin servicer: request checks here, data work in Feed (on the executor), errors in the interceptor."""

    def __init__(self, datasets: dict[str, ServedDataset], limits: Limits, executor: Executor,
                 cursor_secret: bytes = b"", watch: InputBoundWatch | None = None) -> None:
        self.datasets, self.limits, self.executor = datasets, limits, executor
        self.cursor_secret = cursor_secret
        self.admission = Admission(limits)
        self.loop_share = LoopShare()
        self.watch = watch or InputBoundWatch()
        self.streams: Streams[Credits] = Streams()
        self.started = time.monotonic()
        self.accepting = True

    def _dataset(self, name: str, field: str) -> ServedDataset:
        _check_text(field, name)
        if name not in self.datasets:
            raise NotFound(f"{field}: dataset {name!r} is not served here; known: {sorted(self.datasets)}")
        return self.datasets[name]

    def _check_open(self, request: feed_pb2.Open) -> tuple[ServedDataset, int, int]:
        """The dataset, world size and sequence length of a valid Open; RequestError otherwise."""
        dataset = self._dataset(request.dataset or "default", "open.dataset")
        limits = self.limits
        world = request.world_size or 1
        if world > limits.max_world_size:
            raise invalid("open.world_size", f"{world} exceeds the limit {limits.max_world_size}")
        if request.rank >= world:
            raise invalid("open.rank", f"{request.rank} must be < world_size {world}")
        if not 0 < request.batch_size <= limits.max_batch_size:
            raise invalid("open.batch_size", f"{request.batch_size} must be in 1..{limits.max_batch_size}")
        seq_len = request.seq_len or dataset.config.max_seq_len
        if seq_len > limits.max_seq_len:
            raise invalid("open.seq_len", f"{seq_len} exceeds the server's limit {limits.max_seq_len}")
        if request.credits > limits.max_credits:
            raise invalid("open.credits", f"{request.credits} exceeds the limit {limits.max_credits}")
        if request.batch_size * seq_len * 6 > limits.max_message_mb << 20:
            raise invalid("open.batch_size", f"batch_size x seq_len exceeds the {limits.max_message_mb} MB "
                                             "message limit")
        if len(request.cursor) > limits.max_cursor_kb << 10:
            raise invalid("open.cursor", f"{len(request.cursor)} bytes exceeds the limit {limits.max_cursor_kb} KB")
        _check_text("open.client_id", request.client_id)
        _check_text("open.run_id", request.run_id)
        return dataset, world, seq_len

    async def _first(self, request_iterator: AsyncIterator[feed_pb2.StreamRequest]) -> feed_pb2.Open:
        """The stream's Open, which must come first and within `open_timeout_s`."""
        timeout = self.limits.open_timeout_s
        try:
            first = await asyncio.wait_for(anext(aiter(request_iterator), None), timeout)
        except TimeoutError:
            raise TimedOut(f"open: no Open message within {timeout:g} s "
                                                                  "(server.limits.open_timeout_s)") from None
        if not self.accepting:
            raise Unavailable("server is shutting down; reconnect elsewhere")
        if first is None or not first.HasField("open"):
            raise invalid("open", "the first message of a stream must be an Open")
        return first.open

    async def Stream(self, request_iterator: AsyncIterator[feed_pb2.StreamRequest],
                     context: grpc.aio.ServicerContext) -> None:
        """Open, then one batch per credit until the configured epochs end, the client leaves or shutdown."""
        peer = context.peer()
        stalled = None
        with self.admission.slot(peer) as place:  # counted from here, Open or not
            try:
                await self._stream(peer, request_iterator,
                                   _Writer(context, place, self.loop_share, lambda: len(self.streams) > 1))
            except Stalled as err:
                stalled = str(err)
        if stalled is not None:
            # A new error, raised out here: the status waits behind the data the client does not read, maybe until
            # it disconnects, and must not keep the stream's frames (its Feed, its batches) alive meanwhile.
            raise Stalled(stalled)

    async def _stream(self, peer: str, request_iterator: AsyncIterator[feed_pb2.StreamRequest],
                      writer: _Writer) -> None:
        request = await self._first(request_iterator)
        dataset, world, seq_len = self._check_open(request)
        start = None
        if request.cursor:
            start = decode_cursor(request.cursor, fingerprint=dataset.fingerprint, seq_len=seq_len,
                                  secret=self.cursor_secret)
        stream = OpenStream(dataset.name, ClientStream(peer, request.client_id, request.rank, world),
                            Credits(request.credits, self.limits.max_credits, self.limits.idle_timeout_s))
        self.streams.add(stream)
        fields = {"peer": peer, "dataset": dataset.name, "rank": request.rank, "world_size": world,
                  "client_id": request.client_id}
        try:
            loop = asyncio.get_running_loop()
            feed = await loop.run_in_executor(self.executor, lambda: Feed(
                dataset, rank=request.rank, world_size=world, batch_size=request.batch_size, seq_len=seq_len,
                start=start, secret=self.cursor_secret, run=request.run_id))
            stream.client.epoch = feed.epoch
            opened = feed_pb2.StreamResponse(opened=feed_pb2.Opened(dataset=dataset_info(dataset), seq_len=seq_len))
            await writer.write(messages([opened.SerializeToString()], request.accept_parts))
            log.info("stream opened: peer=%s dataset=%s rank=%d/%d batch=%d seq_len=%d resume=%s", peer,
                     dataset.name, request.rank, world, request.batch_size, seq_len, start is not None,
                     extra={**fields, "batch_size": request.batch_size, "seq_len": seq_len,
                            "resume": start is not None})
            reader = asyncio.create_task(self._read_credits(request_iterator, stream))
            try:
                await self._serve(_Producer(feed, dataset.facts.vocab_size, request.accept_parts), dataset,
                                  stream, writer)
            finally:
                reader.cancel()
        finally:
            self.streams.remove(stream)
            log.info("stream closed: peer=%s dataset=%s rank=%d batches=%d", peer, dataset.name, request.rank,
                     stream.client.batches, extra={**fields, "batches": stream.client.batches})

    async def _serve(self, produce: _Producer, dataset: ServedDataset, stream: OpenStream[Credits],
                     writer: _Writer) -> None:
        loop = asyncio.get_running_loop()
        client = stream.client
        upcoming = self._produce(loop, produce, 1)
        try:
            while True:
                produced = await upcoming
                # the next batches (on a worker thread, they are made while these go out): as many as the client
                # has credit for, so a worker-thread hop is shared by several batches and a stalled client holds
                # at most its credits
                ahead = max(1, min(stream.credits.available - len(produced), MAX_AHEAD))
                upcoming = self._produce(loop, produce, ahead)
                for item, response in produced:
                    if item is None:
                        return
                    if item.rows is None:
                        await writer.write(response)
                        client.epoch = item.epoch + 1
                        continue
                    if not await stream.credits.take():
                        return
                    await writer.write(response)
                    client.batches += 1
                    client.tokens += item.rows.tokens
                    client.epoch = item.epoch
                    dataset.throughput.add(item.rows.tokens)
                    stream.throughput.add(item.rows.tokens)
        finally:
            upcoming.cancel()  # batches being made for a stream that ended are dropped, errors included

    def _produce(self, loop: asyncio.AbstractEventLoop, produce: _Producer,
                 count: int) -> asyncio.Future[list[Produced]]:
        """The stream's next batches. Small batches inside an open cached epoch are made right here, at most
        INLINE_TOKENS per call: such a batch is a few hundred microseconds of numpy over the memory map, less than
        a hop to a worker thread and back costs (measured: 1.1k vs 1.8k batches/s of 8x2048). Whatever may block
        or take longer (bigger batches, streaming reads and tokenization, opening an epoch, which permutes the
        whole store) runs on a worker thread, so the event loop's time per batch stays bounded."""
        feed = produce.feed
        tokens = feed.batch_size * feed.seq_len
        if not feed.in_cached_epoch or tokens > INLINE_TOKENS:
            return loop.run_in_executor(self.executor, produce, count)
        made: asyncio.Future[list[Produced]] = loop.create_future()
        made.set_result(produce(max(1, min(count, INLINE_TOKENS // tokens))))
        return made

    async def _read_credits(self, request_iterator: AsyncIterator[feed_pb2.StreamRequest],
                            stream: OpenStream[Credits]) -> None:
        credits = stream.credits
        try:
            async for request in request_iterator:
                if not request.HasField("credit"):
                    raise invalid("credit", "after Open a stream only takes Credit messages")
                if request.credit.HasField("timing"):
                    timing = request.credit.timing
                    del timing.wait_counts[len(WAIT_BUCKETS_S) + 1:]  # buckets the protocol does not define
                    stream.report(timing)
                    self.watch.observe(stream, self.streams.current(), self.datasets[stream.dataset].cached)
                await credits.add(request.credit.credits)
        except (RequestError, grpc.aio.InternalError) as err:  # InternalError: the call broke (client gone)
            await credits.fail(err)
            return
        await credits.close()

    async def drain(self) -> None:
        """Shutdown: refuse new streams; open ones send what they were granted, then end UNAVAILABLE."""
        self.accepting = False
        for stream in self.streams.current():
            await stream.credits.drain()

    async def drained(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for every stream to end; True if they all did."""
        deadline = time.monotonic() + timeout_s
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.streams

    def stats(self, names: list[str] | None = None) -> feed_pb2.Stats:
        """One statistics snapshot of the datasets `names` (default: all): what GetStats returns and /metrics
        renders."""
        return snapshot(self.datasets, self.streams, time.monotonic() - self.started, names)

    async def GetStats(self, request: feed_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> feed_pb2.Stats:
        """Counters for one dataset or all of them."""
        return self.stats([self._dataset(request.dataset, "dataset").name] if request.dataset else None)

    async def ListDatasets(self, request: feed_pb2.ListDatasetsRequest,
                           context: grpc.aio.ServicerContext) -> feed_pb2.ListDatasetsResponse:
        """Every dataset this server defines."""
        return feed_pb2.ListDatasetsResponse(datasets=[dataset_info(self.datasets[n]) for n in sorted(self.datasets)])


class _Writer:
    """A stream's writes, each bounded by its place (see admission.Place.write); long ones take turns (see
    admission.LoopShare)."""

    def __init__(self, context: grpc.aio.ServicerContext, place: Place, share: LoopShare,
                 crowded: Callable[[], bool]) -> None:
        self.context, self.place, self.share, self.crowded = context, place, share, crowded

    async def write(self, response: list[bytes] | None) -> None:
        """Write a response's messages: one, or its Parts, between which the event loop serves other streams."""
        for message in response or ():
            if len(message) > PARTS_OVER:
                await self.share.write(functools.partial(self._write, message), self.crowded)
            else:
                await self._write(message)

    async def _write(self, message: bytes) -> None:
        await self.place.write(self.context.write(message))


class _Producer:
    """Makes a stream's next responses on a worker thread: the Feed's items as ready messages (Parts for big
    ones when the client accepts them)."""

    def __init__(self, feed: Feed, vocab_size: int, parts: bool) -> None:
        self.feed, self.vocab_size, self.parts, self.seq = feed, vocab_size, parts, 0

    def __call__(self, batches: int) -> list[Produced]:
        """Up to `batches` batches (as encoded responses), stopping after an epoch end or the end of the
        stream (item None)."""
        out: list[Produced] = []
        while len(out) < batches:
            item = next(self.feed, None)
            if item is None or item.rows is None:
                end = None if item is None else messages([feed_pb2.StreamResponse(epoch_end=feed_pb2.EpochEnd(
                    epoch=item.epoch, cursor=item.cursor, row=item.row)).SerializeToString()], self.parts)
                out.append((item, end))
                break
            out.append((item, batch_response(item.rows, seq=self.seq, epoch=item.epoch, cursor=item.cursor,
                                             row=item.row, vocab_size=self.vocab_size, parts=self.parts)))
            self.seq += 1
        return out
