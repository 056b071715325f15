"""How often, and how long apart, a token store build that failed for a transient reason is tried again."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: `first_s`, doubling up to `max_s`, at most `attempts` tries in all."""

    attempts: int
    first_s: float
    max_s: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (from 1)."""
        return min(self.first_s * 2 ** (attempt - 1), self.max_s)

    def describe(self, attempt: int, err: BaseException, delay: float) -> str:
        """What GetStats and the log say while waiting: the attempt, the last error, and the next try."""
        at = time.strftime("%H:%M:%S", time.localtime(time.time() + delay))
        return (f"attempt {attempt} of {self.attempts} failed: {type(err).__name__}: {err}; "
                f"next attempt at {at} (in {delay:.0f} s)")


BUILD_BACKOFF = Backoff(attempts=8, first_s=2.0, max_s=120.0)
"""2, 4, 8, ... 120 s: a build retries for about four minutes before the dataset is failed."""
