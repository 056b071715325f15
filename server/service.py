"""The DataFeed servicer: validates requests, runs each stream's Feed in a worker thread, honours credits."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc

from ..protos import feed_pb2, feed_pb2_grpc
from .config import Limits
from .cursor import decode_cursor
from .dataset import ServedDataset
from .errors import RequestError, invalid
from .feed import Feed, FeedItem
from .stats import ClientStream
from .wire import to_batch

log = logging.getLogger(__name__)


class Credits:
    """Batches a stream may still send; refilled by the client's Credit messages."""

    def __init__(self, initial: int, limit: int) -> None:
        self.available, self.limit = initial, limit
        self.closed = False  # the client will send no more credits
        self.error: RequestError | None = None
        self.changed = asyncio.Condition()

    async def add(self, credits: int) -> None:
        """Grant more; more outstanding than the limit is a client error."""
        async with self.changed:
            if self.available + credits > self.limit:
                self.error = invalid("credit.credits", f"more than {self.limit} batches outstanding")
            self.available += credits
            self.changed.notify_all()

    async def fail(self, error: RequestError) -> None:
        """End the stream with this client error."""
        async with self.changed:
            self.error = error
            self.changed.notify_all()

    async def close(self) -> None:
        """The client half-closed its side: no more credits will come."""
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def take(self) -> bool:
        """Wait for one credit and use it; False when none can ever come."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.available > 0 or self.closed or self.error)
            if self.error:
                raise self.error
            if self.available == 0:
                return False
            self.available -= 1
            return True


class DataFeedService(feed_pb2_grpc.DataFeedServicer):
    """Thin servicer: request checks here, data work in Feed (on the executor), errors in the interceptor."""

    def __init__(self, datasets: dict[str, ServedDataset], limits: Limits, executor: Executor) -> None:
        self.datasets, self.limits, self.executor = datasets, limits, executor
        self.clients: dict[int, tuple[str, ClientStream]] = {}
        self.started = time.monotonic()
        self.accepting = True

    def _dataset(self, name: str) -> ServedDataset:
        if name not in self.datasets:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"dataset {name!r} is not served here; known: {sorted(self.datasets)}")
        return self.datasets[name]

    def _check_open(self, request: feed_pb2.Open) -> tuple[ServedDataset, int, int]:
        """The dataset, world size and sequence length of a valid Open; RequestError otherwise."""
        dataset = self._dataset(request.dataset or "default")
        limits = self.limits
        world = request.world_size or 1
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
        if len(self.clients) >= limits.max_streams:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{limits.max_streams} streams already open (server.limits.max_streams)")
        return dataset, world, seq_len

    async def Stream(self, request_iterator: AsyncIterator[feed_pb2.StreamRequest],
                     context: grpc.aio.ServicerContext) -> None:
        """Open, then one batch per credit until the configured epochs end or the client leaves."""
        if not self.accepting:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect elsewhere")
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("open"):
            raise invalid("open", "the first message of a stream must be an Open")
        request = first.open
        dataset, world, seq_len = self._check_open(request)
        start = None
        if request.cursor:
            start = decode_cursor(request.cursor, fingerprint=dataset.fingerprint, rank=request.rank,
                                  world_size=world)
        loop = asyncio.get_running_loop()
        feed = await loop.run_in_executor(self.executor, lambda: Feed(
            dataset, rank=request.rank, world_size=world, batch_size=request.batch_size, seq_len=seq_len,
            start=start))
        await context.write(feed_pb2.StreamResponse(
            opened=feed_pb2.Opened(dataset=dataset.info(), seq_len=seq_len)))
        client = ClientStream(context.peer(), request.client_id, request.rank, world,
                              epoch=feed.epoch, credits=request.credits)
        key = id(client)
        self.clients[key] = (dataset.name, client)
        credits = Credits(request.credits, self.limits.max_credits)
        reader = asyncio.create_task(self._read_credits(request_iterator, credits, client))
        log.info("stream opened: peer=%s dataset=%s rank=%d/%d batch=%d seq_len=%d resume=%s",
                 context.peer(), dataset.name, request.rank, world, request.batch_size, seq_len,
                 start is not None)
        try:
            await self._serve(feed, dataset, credits, client, context)
        finally:
            reader.cancel()
            del self.clients[key]
            log.info("stream closed: peer=%s dataset=%s rank=%d batches=%d", context.peer(), dataset.name,
                     request.rank, client.batches)

    async def _serve(self, feed: Feed, dataset: ServedDataset, credits: Credits, client: ClientStream,
                     context: grpc.aio.ServicerContext) -> None:
        loop = asyncio.get_running_loop()
        vocab = dataset.encoder.vocab_size
        seq = 0
        while True:
            item: FeedItem | None = await loop.run_in_executor(self.executor, next, feed, None)
            if item is None:
                return
            if item.rows is None:
                await context.write(feed_pb2.StreamResponse(
                    epoch_end=feed_pb2.EpochEnd(epoch=item.epoch, cursor=item.cursor)))
                client.epoch = item.epoch + 1
                continue
            message = to_batch(item.rows, seq=seq, epoch=item.epoch, cursor=item.cursor, vocab_size=vocab)
            if not await credits.take():
                return
            client.credits = credits.available
            await context.write(feed_pb2.StreamResponse(batch=message))
            seq += 1
            client.batches += 1
            client.tokens += item.rows.tokens
            client.epoch = item.epoch
            dataset.throughput.add(item.rows.tokens)

    async def _read_credits(self, request_iterator: AsyncIterator[feed_pb2.StreamRequest],
                            credits: Credits, client: ClientStream) -> None:
        async for request in request_iterator:
            if not request.HasField("credit"):
                await credits.fail(invalid("credit", "after Open a stream only takes Credit messages"))
                return
            await credits.add(request.credit.credits)
            client.credits = credits.available
        await credits.close()

    async def GetStats(self, request: feed_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> feed_pb2.Stats:
        """Counters for one dataset or all of them."""
        names = [self._dataset(request.dataset).name] if request.dataset else sorted(self.datasets)
        out = []
        for name in names:
            dataset = self.datasets[name]
            clients = [c.to_proto() for d, c in self.clients.values() if d == name]
            out.append(feed_pb2.DatasetStats(
                name=name, info=dataset.info(), sources=[c.to_proto() for c in dataset.counters], clients=clients,
                cache=dataset.cache_state(),
                batches_served=dataset.throughput.batches, tokens_served=dataset.throughput.tokens,
                tokens_per_s=dataset.throughput.rate()))
        return feed_pb2.Stats(datasets=out, uptime_s=time.monotonic() - self.started)

    async def ListDatasets(self, request: feed_pb2.ListDatasetsRequest,
                           context: grpc.aio.ServicerContext) -> feed_pb2.ListDatasetsResponse:
        """Every dataset this server defines."""
        return feed_pb2.ListDatasetsResponse(datasets=[self.datasets[n].info() for n in sorted(self.datasets)])
