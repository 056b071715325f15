"""How failed I/O is tried again: a token store build that failed for a transient reason (a number of attempts,
further and further apart), and a read of remote storage (a shard fetch, a samples table) that rides out an
outage for a bounded window of time with jittered waits.

`SIGIL_FEED_STORAGE_RETRY_S` (seconds, default 60) sets how long a read of remote storage may go without
progress before the stream that waits for it ends with UNAVAILABLE (the client then reconnects and resumes).
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass

from ..errors import ConfigError

STORAGE_RETRY_ENV = "SIGIL_FEED_STORAGE_RETRY_S"


def _exponential(first_s: float, max_s: float, attempt: int) -> float:
    return float(min(first_s * 2 ** (attempt - 1), max_s))


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: `first_s`, doubling up to `max_s`, at most `attempts` tries in all."""

    attempts: int
    first_s: float
    max_s: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (from 1)."""
        return _exponential(self.first_s, self.max_s, attempt)

    def describe(self, attempt: int, err: BaseException, delay: float) -> str:
        """What GetStats and the log say while waiting: the attempt, the last error, and the next try."""
        at = time.strftime("%H:%M:%S", time.localtime(time.time() + delay))
        return (f"attempt {attempt} of {self.attempts} failed: {type(err).__name__}: {err}; "
                f"next attempt at {at} (in {delay:.0f} s)")


BUILD_BACKOFF = Backoff(attempts=8, first_s=2.0, max_s=120.0)
"""2, 4, 8, ... 120 s: a build retries for about four minutes before the dataset is failed."""


@dataclass(frozen=True)
class RetryWindow:
    """Transient failures of one read are tried again, after waits of `first_s` doubling up to `max_s` (each cut
    by a random share of up to `jitter`, so that many readers do not come back at once), until the read has made
    no progress for `window_s` seconds."""

    window_s: float
    first_s: float = 0.5
    max_s: float = 8.0
    jitter: float = 0.5

    def start(self, stop: threading.Event | None = None) -> Retries:
        """The retries of one read; `stop` (set when the server stops) ends the waiting at once."""
        return Retries(self, stop or threading.Event())


class Retries:
    """One read's retries under a RetryWindow: call `progressed()` when it gets somewhere, `wait()` after each
    transient failure."""

    def __init__(self, window: RetryWindow, stop: threading.Event) -> None:
        self.window, self.stop = window, stop
        self.failures = 0  # in all
        self._streak = 0  # since the last progress
        self._since = time.monotonic()

    def progressed(self) -> None:
        """The read got somewhere (bytes arrived): the window starts again."""
        self._streak, self._since = 0, time.monotonic()

    @property
    def stalled_s(self) -> float:
        """Seconds since the read started or last made progress."""
        return time.monotonic() - self._since

    def wait(self) -> bool:
        """After a transient failure: wait, then True (try again); False at once if the window would be spent
        before the next try, or when the server stops."""
        self.failures += 1
        self._streak += 1
        delay = _exponential(self.window.first_s, self.window.max_s, self._streak)
        delay *= 1 - self.window.jitter * random.random()
        if self.stop.is_set() or self.stalled_s + delay > self.window.window_s:
            return False
        return not self.stop.wait(delay)

    def describe(self) -> str:
        """Why the retries ended, for the error raised then."""
        if self.stop.is_set():
            return f"the server is stopping ({self.failures} failed attempts)"
        return f"no progress for {self.stalled_s:.0f} s ({self.failures} failed attempts)"


def storage_retry() -> RetryWindow:
    """The window for reads of remote storage: SIGIL_FEED_STORAGE_RETRY_S seconds, 60 by default."""
    text = os.environ.get(STORAGE_RETRY_ENV, "").strip()
    try:
        window_s = float(text) if text else 60.0
    except ValueError:
        window_s = -1.0
    if not window_s > 0:
        raise ConfigError(f"{text!r} is not a positive number of seconds", key=STORAGE_RETRY_ENV,
                          fix="set it to how long a read of remote storage may make no progress, e.g. 60")
    return RetryWindow(window_s)
