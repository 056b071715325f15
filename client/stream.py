"""The DataFeed stream seen from the client: credits, a receiving thread and transparent reconnects."""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import random
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from ..protos import feed_pb2
from .decode import decode_batch
from .parts import PartsCut, PartsError, stream_method, whole
from .timing import StepTimer

log = logging.getLogger(__name__)

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED,
                             grpc.StatusCode.DEADLINE_EXCEEDED})
"""Statuses after which the client reconnects and resumes instead of failing."""

DEFAULT_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.max_receive_message_length": 512 * 1024 * 1024,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}
"""Channel options used unless overridden: large batches, and a channel that notices a restart fast."""

REPEATED_FAILURES = 2
"""Failed attempts after which a reconnect is logged as a WARNING (one that resumes at once is INFO)."""
SERVE_HINT = "is the sidecar running? Start it with `sigil-feed serve --config <config.yaml>`"
_POLL_S = 0.1


class FeedError(RuntimeError):
    """Base class of the errors the sigil-feed client raises."""


class FeedConnectionError(FeedError):
    """The server could not be reached, or the stream could not be resumed, within the deadline. When the server
    did answer (each attempt refused for now, e.g. UNAVAILABLE while its store builds or while it shuts down),
    `code` and `details` are its last answer's status and message; otherwise both are None."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str | None = None) -> None:
        super().__init__(message)
        self.code, self.details = code, details


class FeedServerError(FeedError):
    """The server refused the stream with a non-transient gRPC status."""

    def __init__(self, target: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"sigil-feed server at {target}: {code.name}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class FeedBatch:
    """One decoded batch, with the cursor that resumes right after it."""

    seq: int
    epoch: int
    cursor: bytes
    tokens: int
    arrays: dict[str, np.ndarray]
    row: int = 0  # the position after it: the global row of the epoch where the next step starts


@dataclass(frozen=True)
class EpochEnd:
    """Marks the end of an epoch; its cursor resumes at the start of the next one."""

    epoch: int
    cursor: bytes
    row: int = 0  # where the epoch ended: the global row after its last step


StreamItem = FeedBatch | EpochEnd


@dataclass(frozen=True)
class _Failure:
    """The receiving thread stopped on this error; the consumer re-raises it."""

    error: Exception


class _End:
    """The server completed the stream: every configured epoch was sent."""


class _Closed(Exception):
    """Internal: the stream was closed locally, stop quietly."""


class _Retry(Exception):
    """Internal: one open attempt failed in a way worth retrying; `status` when the server answered it."""

    def __init__(self, message: str, status: tuple[grpc.StatusCode, str] | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Outbox:
    """Outgoing messages of one RPC attempt, drained by gRPC's request thread."""

    def __init__(self, open_msg: feed_pb2.Open) -> None:
        self._messages: queue.SimpleQueue[feed_pb2.StreamRequest | None] = queue.SimpleQueue()
        self._messages.put(feed_pb2.StreamRequest(open=open_msg))

    def credit(self, credits: int, timing: feed_pb2.StepTiming | None = None) -> None:
        """Grant the server `credits` more batches, with the loop's timing when a report is due."""
        self._messages.put(feed_pb2.StreamRequest(credit=feed_pb2.Credit(credits=credits, timing=timing)))

    def close(self) -> None:
        """End the request stream so gRPC's request thread exits."""
        self._messages.put(None)

    def __iter__(self) -> Iterator[feed_pb2.StreamRequest]:
        """Yield messages until closed."""
        while (message := self._messages.get()) is not None:
            yield message


def _backoff(attempt: int, initial_s: float = 0.1, cap_s: float = 5.0) -> float:
    """Exponential backoff with jitter for the given (1-based) attempt."""
    return min(cap_s, initial_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _describe(error: grpc.RpcError) -> str:
    """A short 'CODE: details' text for an RPC error."""
    return f"{error.code().name}: {error.details()}"


_OPEN_LINKS: weakref.WeakSet[_Link] = weakref.WeakSet()
"""Streams not closed yet: closed at exit, before the interpreter tears down the modules gRPC needs."""


@atexit.register
def _close_open_links() -> None:
    """Close streams a script left open (an iterator never exhausted), so exit is silent and immediate."""
    for link in list(_OPEN_LINKS):
        link.close()


class _Link:
    """Connection, credits, receiving thread and reconnects; shared by BatchStream and its thread."""

    def __init__(self, target: str, template: feed_pb2.Open, prefetch: int, connect_deadline_s: float,
                 reconnect_deadline_s: float, channel: grpc.Channel, metadata: Sequence[tuple[str, str]],
                 max_response_bytes: int | None, timer: StepTimer | None = None) -> None:
        self.target, self._template, self._prefetch, self._timer = target, template, prefetch, timer
        self._connect_deadline_s, self._reconnect_deadline_s = connect_deadline_s, reconnect_deadline_s
        self._channel, self._metadata = channel, tuple(metadata)
        self._stream, self._max_response_bytes = stream_method(channel), max_response_bytes
        # credits bound the batches to `prefetch`; the slack holds epoch markers and the final item
        self._items: queue.Queue[StreamItem | _Failure | _End] = queue.Queue(maxsize=prefetch + 2)
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._buffered = 0
        self._owed = 0  # credits earned by batches taken but not yet granted: they go out in chunks
        self._credit_chunk = max(1, prefetch // 2)
        self._resume_cursor = template.cursor
        self._outbox: _Outbox | None = None
        self._call: Any = None
        self._responses: Iterator[feed_pb2.StreamResponse] = iter(())  # the current call's, Parts joined
        self._thread: threading.Thread | None = None
        self.opened = feed_pb2.Opened()
        _OPEN_LINKS.add(self)

    def start(self) -> None:
        """Open the stream (blocking up to the connect deadline), then start receiving."""
        self._open(self._connect_deadline_s, reconnecting=False)
        self._thread = threading.Thread(target=self._run, name=f"sigil-feed-{self.target}", daemon=True)
        self._thread.start()

    def take(self) -> StreamItem | _Failure | _End:
        """Block for the next item; hand back one credit for each batch taken."""
        while not self._closed.is_set():
            try:
                item = self._items.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, FeedBatch):
                self._return_credit()
            return item
        return _End()

    def _return_credit(self) -> None:
        """A batch left the buffer: its credit is granted on the current call once half the prefetch is owed
        (one Credit message per chunk, not per batch; the server always holds the other half), or counted for
        the next Open."""
        with self._cond:
            self._buffered -= 1
            self._owed += 1
            if self._outbox is not None and self._owed >= self._credit_chunk:
                self._outbox.credit(self._owed, self._timer.report() if self._timer else None)
                self._owed = 0
            self._cond.notify_all()

    def close(self) -> None:
        """Cancel the RPC, stop the thread and close the channel; idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        _OPEN_LINKS.discard(self)
        with self._cond:
            self._cond.notify_all()
        self._end_call()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._channel.close()

    def _run(self) -> None:
        """Thread body: receive until the server completes, reconnecting on transient errors."""
        try:
            while True:
                error = self._pump()
                self._end_call()
                if error is None:
                    self._put(_End())
                    return
                self._reconnect(error)
        except _Closed:
            return
        except Exception as exc:  # handed to the consumer, which re-raises it
            self._end_call()
            self._put_final(_Failure(exc))

    def _put_final(self, item: _Failure) -> None:
        """Queue the error that ends the thread, unless the stream was closed meanwhile."""
        with contextlib.suppress(_Closed):
            self._put(item)

    def _pump(self) -> str | None:
        """Deliver the current call's messages; None when it completes, what broke it if that is transient (a
        transient status, or a call that ended inside a Part sequence)."""
        try:
            for response in self._responses:
                self._deliver(response)
        except grpc.RpcError as exc:
            if self._closed.is_set():
                raise _Closed from None
            if exc.code() in TRANSIENT_CODES:
                return _describe(exc)
            raise FeedServerError(self.target, exc.code(), exc.details()) from None
        except PartsCut as cut:
            if self._closed.is_set():
                raise _Closed from None
            return str(cut)
        return None

    def _deliver(self, response: feed_pb2.StreamResponse) -> None:
        """Decode one message and queue it for the consumer."""
        kind = response.WhichOneof("kind")
        if kind == "batch":
            batch = response.batch
            item: StreamItem = FeedBatch(batch.seq, batch.epoch, batch.cursor, batch.tokens,
                                         decode_batch(batch, self.opened.dataset.pack), batch.row)
            with self._cond:
                self._buffered += 1
        elif kind == "epoch_end":
            item = EpochEnd(response.epoch_end.epoch, response.epoch_end.cursor, response.epoch_end.row)
        else:
            raise FeedError(f"sigil-feed server at {self.target} sent {kind!r} in the middle of a stream")
        self._resume_cursor = item.cursor
        self._put(item)

    def _put(self, item: StreamItem | _Failure | _End) -> None:
        """Queue an item for the consumer, giving up if the stream is closed meanwhile."""
        while not self._closed.is_set():
            try:
                self._items.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise _Closed

    def _reconnect(self, error: str) -> None:
        """Re-open from the last batch received once the consumer has room for a batch. A reconnect that
        resumes at its first attempt loses nothing and is normal (e.g. after a pause in training longer than
        the server's idle timeout): INFO. One whose attempts fail repeatedly is a WARNING."""
        log.info("stream to sigil-feed server at %s broke (%s); reconnecting from the last batch received",
                 self.target, error)
        with self._cond:
            self._cond.wait_for(lambda: self._buffered < self._prefetch or self._closed.is_set())
        attempts, elapsed = self._open(self._reconnect_deadline_s, reconnecting=True, first_error=error)
        log.log(logging.INFO if attempts == 1 else logging.WARNING, "resumed stream to %s after %d attempt(s) "
                "in %.1fs, from the last batch received", self.target, attempts, elapsed)

    def _open(self, budget_s: float, *, reconnecting: bool,
              first_error: str | None = None) -> tuple[int, float]:
        """Try to open the stream with backoff until `budget_s` runs out; return (attempts, seconds). The server's
        last answer (a refusal for now, e.g. UNAVAILABLE while its store builds) is kept for the error: an attempt
        the deadline cuts short does not replace it."""
        start = time.monotonic()
        deadline = start + budget_s
        last, answer, answered = first_error or "none", None, 0
        attempts = 0
        while True:
            if self._closed.is_set():
                raise _Closed
            attempts += 1
            try:
                self._accept(self._attempt(deadline))
                return attempts, time.monotonic() - start
            except _Retry as exc:
                last = str(exc)
                if exc.status is not None:
                    answer, answered = exc.status, answered + 1
                log.debug("open attempt %d to %s failed: %s", attempts, self.target, last)
                if reconnecting and attempts == REPEATED_FAILURES:
                    log.warning("reconnecting to sigil-feed server at %s: %d attempts failed, the last with %s; "
                                "retrying until %gs have passed", self.target, attempts, last, budget_s)
            self._end_call()
            remaining = deadline - time.monotonic()
            if remaining > 0:
                self._closed.wait(min(_backoff(attempts), remaining))
            if self._closed.is_set():
                raise _Closed
            if time.monotonic() >= deadline:  # no attempt the deadline would cut short at once
                raise self._give_up(reconnecting, attempts, time.monotonic() - start, last, answer, answered)

    def _give_up(self, reconnecting: bool, attempts: int, elapsed: float, last: str,
                 answer: tuple[grpc.StatusCode, str] | None, answered: int) -> FeedConnectionError:
        """The error raised once the connect or reconnect deadline has passed. If the server answered (it runs,
        but refused the stream for now), its last answer, and no hint that the sidecar is down; else what failed
        and the hint to start the sidecar."""
        deadline = self._reconnect_deadline_s if reconnecting else self._connect_deadline_s
        tried = f"{attempts} attempt(s) over {elapsed:.1f}s (deadline {deadline:g}s)"
        if answer is not None:
            code, details = answer
            what = "did not resume the stream" if reconnecting else "did not open the stream"
            also = "" if answered == attempts else f"; it answered {answered} of them, the others: {last}"
            return FeedConnectionError(
                f"the sigil-feed server at {self.target} answered but {what}: {tried}, its last answer "
                f"{code.name}: {details}{also} (the server runs but refuses streams for now, e.g. while its token "
                "store builds or while it shuts down: retry later, or give the client a longer "
                f"{'reconnect_deadline_s' if reconnecting else 'connect_deadline_s'})", code, details)
        what = "could not resume the stream from" if reconnecting else "could not reach"
        return FeedConnectionError(f"{what} the sigil-feed server at {self.target}: {tried}, last error: {last}; "
                                   f"{SERVE_HINT}")

    def _attempt(self, deadline: float) -> feed_pb2.Opened:
        """One attempt: send Open from the resume cursor and wait (for the channel too) for Opened."""
        with self._cond:
            credits, self._owed = self._prefetch - self._buffered, 0
            self._outbox = _Outbox(self._open_message(credits))
            self._call = call = self._stream(iter(self._outbox), metadata=self._metadata, wait_for_ready=True)
            self._responses = responses = self._joined(call)
        if self._closed.is_set():
            self._end_call()
            raise _Closed
        timed_out = threading.Event()
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire, (call, timed_out))
        timer.daemon = True
        timer.start()
        try:
            first = next(responses)
        except StopIteration:
            raise FeedError(f"sigil-feed server at {self.target} ended the stream before answering Open") \
                from None
        except PartsCut as cut:
            raise _Retry(str(cut)) from None
        except grpc.RpcError as exc:
            if self._closed.is_set():
                raise _Closed from None
            if timed_out.is_set():
                raise _Retry("no connection, or no answer to Open, before the deadline") from None
            if exc.code() in TRANSIENT_CODES:  # with wait_for_ready, a status the server answered (or a broken call)
                raise _Retry(_describe(exc), (exc.code(), exc.details()) if exc.details() else None) from None
            raise FeedServerError(self.target, exc.code(), exc.details()) from None
        finally:
            timer.cancel()
        kind = first.WhichOneof("kind")
        if kind != "opened":
            raise FeedError(f"sigil-feed server at {self.target} answered Open with {kind!r}")
        return first.opened

    def _joined(self, call: Iterator[feed_pb2.StreamResponse | Any]) -> Iterator[feed_pb2.StreamResponse]:
        """The call's responses with their Parts joined; Parts of a response cut short by a break, or by the call
        ending inside them (PartsCut, which _pump treats as a break), are dropped with this iterator (the next call
        resumes at the last whole batch, which comes again). Parts that form no response are a FeedError."""
        try:
            yield from whole(call, self._max_response_bytes)
        except PartsCut:
            raise
        except PartsError as err:
            raise FeedError(f"sigil-feed server at {self.target}: {err}") from None

    @staticmethod
    def _expire(call: Any, timed_out: threading.Event) -> None:
        """Timer callback: cancel a call whose Opened did not arrive in time."""
        timed_out.set()
        call.cancel()

    def _open_message(self, credits: int) -> feed_pb2.Open:
        """The Open message for resuming at the last batch received with `credits` credits."""
        message = feed_pb2.Open()
        message.CopyFrom(self._template)
        message.cursor, message.credits = self._resume_cursor, credits
        return message

    def _accept(self, opened: feed_pb2.Opened) -> None:
        """Keep the first Opened; a resumed stream must serve the same dataset and seq_len."""
        if self.opened.HasField("dataset"):
            before, after = self.opened, opened
            if (before.dataset.fingerprint, before.seq_len) != (after.dataset.fingerprint, after.seq_len):
                raise FeedError(
                    f"sigil-feed server at {self.target} now serves dataset {after.dataset.name!r} with "
                    f"fingerprint {after.dataset.fingerprint!r} and seq_len {after.seq_len}; the stream "
                    f"began with {before.dataset.fingerprint!r} and seq_len {before.seq_len}: cannot resume")
        else:
            self.opened = opened

    def _end_call(self) -> None:
        """Cancel the current call and end its request stream."""
        with self._cond:
            call, outbox = self._call, self._outbox
            self._call = self._outbox = None
            self._responses = iter(())
        if outbox is not None:
            outbox.close()
        if call is not None:
            call.cancel()


class BatchStream:
    """Iterator of FeedBatch and EpochEnd items from a sigil-feed server, with credits and reconnects."""

    def __init__(self, target: str, dataset: str = "default", *, batch_size: int, seq_len: int = 0,
                 rank: int = 0, world_size: int = 1, cursor: bytes = b"", prefetch: int = 4,
                 client_id: str = "", run_id: str = "", connect_deadline_s: float = 60.0,
                 reconnect_deadline_s: float = 300.0,
                 channel_options: Sequence[tuple[str, Any]] = (),
                 credentials: grpc.ChannelCredentials | None = None,
                 metadata: Sequence[tuple[str, str]] = (), report_timing: bool = True) -> None:
        """Connect and open the stream; raises FeedConnectionError or FeedServerError on failure.

        report_timing: tell the server how long the loop waits for data (see client/timing.py)."""
        _check_args(batch_size, seq_len, rank, world_size, prefetch)
        merged = {**DEFAULT_CHANNEL_OPTIONS, **dict(channel_options)}
        options = list(merged.items())
        max_response = int(merged["grpc.max_receive_message_length"])
        channel = (grpc.secure_channel(target, credentials, options) if credentials is not None
                   else grpc.insecure_channel(target, options))
        template = feed_pb2.Open(dataset=dataset, rank=rank, world_size=world_size, batch_size=batch_size,
                                 seq_len=seq_len, cursor=cursor, client_id=client_id, accept_parts=True,
                                 run_id=run_id)
        self.cursor = cursor
        self._terminal: _Failure | _End | None = None
        self._timer = StepTimer() if report_timing else None
        self._link = _Link(target, template, prefetch, connect_deadline_s, reconnect_deadline_s, channel,
                           metadata, max_response if max_response >= 0 else None, self._timer)
        try:
            self._link.start()
        except BaseException:
            self._link.close()
            raise

    @property
    def info(self) -> feed_pb2.DatasetInfo:
        """The dataset's facts from the server's Opened answer."""
        return self._link.opened.dataset

    @property
    def seq_len(self) -> int:
        """The sequence length every batch has."""
        return self._link.opened.seq_len

    def __iter__(self) -> BatchStream:
        """The stream is its own iterator."""
        return self

    def __next__(self) -> StreamItem:
        """The next batch or epoch marker; StopIteration once the server has sent every epoch."""
        if self._timer is not None:
            self._timer.waiting()
        item = self._terminal or self._link.take()
        if isinstance(item, _End):
            self._finish(item)
            raise StopIteration
        if isinstance(item, _Failure):
            self._finish(item)
            raise item.error
        self.cursor = item.cursor
        if self._timer is not None and isinstance(item, FeedBatch):
            self._timer.served()
        return item

    def _finish(self, terminal: _Failure | _End) -> None:
        """Remember how the stream ended and release its resources."""
        self._terminal = terminal
        self._link.close()

    def close(self) -> None:
        """Cancel the RPC, stop the receiving thread and close the channel."""
        self._link.close()

    def __enter__(self) -> BatchStream:
        """Context-manager entry: the open stream."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Context-manager exit: close the stream."""
        self.close()

    def __del__(self) -> None:
        """Close on garbage collection so an abandoned stream leaves no thread behind."""
        link = getattr(self, "_link", None)
        if link is not None:
            link.close()


def _check_args(batch_size: int, seq_len: int, rank: int, world_size: int, prefetch: int) -> None:
    """Reject arguments the server would refuse anyway, with a clearer message."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0 (0: the server's default), got {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
