"""Progress of long work (a store build, a JSONL offset pass, a shard download, a wait for another builder):
a bar with its total and ETA where stderr is a terminal and logs are text; otherwise a log line every
`SIGIL_FEED_PROGRESS_S` seconds (15 by default), which `--log-json` writes as JSON like any other record.
Never a bar, nor a carriage return, among JSON logs."""

from __future__ import annotations

import logging
import math
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger(__name__)

EVERY_ENV = "SIGIL_FEED_PROGRESS_S"
EVERY_S = 15.0  # between two log lines, without a terminal
QUIET_S = 3.0  # work that may be short (an offset pass, a download) says nothing before this
LIBRARY_BARS = ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")  # read when they are imported

_bars_allowed = True  # False once logs are JSON (see allow_bars)


def allow_bars(allowed: bool) -> None:
    """Whether a terminal may show bars: the logging setup says no when logs are JSON lines. Where no bar is
    shown, neither are the Hugging Face libraries' (they would write carriage returns into the logs)."""
    global _bars_allowed
    _bars_allowed = allowed
    if not shows_bars(sys.stderr):
        for name in LIBRARY_BARS:
            os.environ.setdefault(name, "1")


def shows_bars(stream: TextIO) -> bool:
    """Whether progress written to `stream` is a bar (a terminal, text logs) rather than log lines."""
    try:
        return _bars_allowed and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def report_every_s() -> float:
    """Seconds between two progress log lines: SIGIL_FEED_PROGRESS_S, else 15."""
    value = os.environ.get(EVERY_ENV)
    return float(value) if value else EVERY_S


def file_bytes(path: str) -> int:
    """A source file's size (0 for what is no local file, such as a Hugging Face dataset's name or folder)."""
    try:
        status = os.stat(path)
    except OSError:
        return 0
    return status.st_size if stat.S_ISREG(status.st_mode) else 0


def part_bytes(paths: list[str], files: list[int]) -> list[int]:
    """Each part's share of its file's bytes (`files`: each part's file index): the file cut evenly among its
    parts, so the shares of a file add up to its size."""
    count = Counter(files)
    sizes = {file: file_bytes(paths[file]) for file in count}
    shares, seen = [], Counter[int]()
    for file in files:
        size, n, k = sizes[file], count[file], seen[file]
        shares.append(size * (k + 1) // n - size * k // n)
        seen[file] += 1
    return shares


class PartMeter:
    """What a store build counts: its source files' bytes (known up front, unlike samples), each part advancing
    by its share of its file; or, where no file has a size (Hugging Face datasets), parts, without a total."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.total = sum(file_bytes(path) for path in paths) or None
        self.unit = "B" if self.total else "parts"

    def shares(self, paths: list[str], files: list[int]) -> list[int]:
        """What each part (`files`: each part's file index in `paths`) adds when it is done."""
        return part_bytes(paths, files) if self.total else [1] * len(files)


def amount(n: float, unit: str | None) -> str:
    """`1.2 GB` for bytes (decimal units), else `1,234 samples`."""
    if unit != "B":
        number = f"{n:,.0f}" if n >= 100 or float(n).is_integer() else f"{n:.2g}"
        return f"{number} {unit}" if unit else number
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {prefix}B" if prefix == "" else f"{n:.1f} {prefix}B"
        n /= 1000
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """`0.4 s`, `52 s`, `4 min 10 s`, `2 h 05 min`."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    s = math.ceil(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """One piece of long work: `at(done)` / `advance(n)` of `total` (None: unknown) in `unit` (None: nothing is
    counted, as when waiting), and `note(text)` for a status. In a terminal a tqdm bar, shown once `after_s` has
    passed; else a log line once `after_s` has passed and then every `every_s` (SIGIL_FEED_PROGRESS_S), and a
    last one at `close` if any but a first was written. `enabled=False` shows nothing."""

    def __init__(self, what: str, *, total: int | None = None, unit: str | None = "B", after_s: float = 0.0,
                 every_s: float | None = None, enabled: bool = True, label: str | None = None,
                 clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None,
                 logger: logging.Logger = log) -> None:
        self.what, self.total, self.unit = what, total or None, unit
        self.after_s = after_s
        self.every_s = report_every_s() if every_s is None else every_s
        self.clock, self.logger = clock, logger
        self.done, self.text = 0, ""
        self.started = self._last_t = clock()
        self._last_done, self._lines, self._closed = 0, 0, not enabled
        self._progressed = False  # a line was written after the first, so the last line says how it ended
        stream = stream if stream is not None else sys.stderr
        self._bar = self._new_bar(stream, label or what) if enabled and shows_bars(stream) else None
        if not self._closed:
            self._tick(start=True)

    def _new_bar(self, stream: TextIO, label: str) -> tqdm:
        if self.unit is None:
            return tqdm(desc=label, file=stream, delay=self.after_s, bar_format="{desc}: {postfix} [{elapsed}]",
                        dynamic_ncols=True)
        bytes_ = self.unit == "B"
        return tqdm(desc=label, total=self.total, unit=self.unit if bytes_ else f" {self.unit}", unit_scale=bytes_,
                    unit_divisor=1000, file=stream, delay=self.after_s, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        """`n` more done."""
        self.at(self.done + n)

    def at(self, done: int) -> None:
        """`done` of the total done so far."""
        if self._closed or done == self.done:
            return
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        self._tick()

    def note(self, text: str) -> None:
        """A status shown with the counts (a waiter's: who builds, and its heartbeat)."""
        if self._closed:
            return
        self.text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(0)
        self._tick()

    def _tick(self, *, start: bool = False) -> None:
        if self._bar is not None:
            return
        now = self.clock()
        if now - self.started < self.after_s or (self._lines and now - self._last_t < self.every_s):
            return
        rate = None if start or now <= self._last_t else (self.done - self._last_done) / (now - self._last_t)
        self._log(self.line(now, rate), now, rate)
        self._last_t, self._last_done, self._lines = now, self.done, self._lines + 1
        self._progressed = self._progressed or not start

    def line(self, now: float, rate: float | None) -> str:
        """The log line's text: what, how far (of the total), the rate, the ETA, the status."""
        if self.unit is None:
            parts = [self.text] if self.text else []
            return f"{self.what}: {', '.join([*parts, f'{duration(now - self.started)} so far'])}"
        parts = []
        if self.total:
            parts.append(f"{min(100, 100 * self.done // self.total)}% ({amount(self.done, self.unit)} of "
                         f"{amount(self.total, self.unit)})")
        else:
            parts.append(amount(self.done, self.unit))
        if rate is not None:
            parts.append(f"{amount(rate, self.unit)}/s")
            if self.total and rate > 0 and self.done < self.total:
                parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        if self.text:
            parts.append(self.text)
        return f"{self.what}: {', '.join(parts)}"

    def _log(self, message: str, now: float, rate: float | None) -> None:
        fields: dict[str, Any] = {"what": self.what, "done": self.done, "total": self.total, "unit": self.unit,
                                  "elapsed_s": round(now - self.started, 3)}
        if rate is not None:
            fields["rate_per_s"] = round(rate, 3)
            if self.total and rate > 0 and self.done < self.total:
                fields["eta_s"] = round((self.total - self.done) / rate, 1)
        self.logger.info("%s", message, extra={"progress": fields})

    def close(self, *, finished: bool = True) -> None:
        """End the bar; without one, a last line if any was written (`finished`: the work is done)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if not (self._progressed and finished):
            return
        now = self.clock()
        took = duration(now - self.started)
        if self.unit is None:
            self._log(f"{self.what}: waited {took}", now, None)
            return
        average = self.done / (now - self.started) if now > self.started else None
        speed = f" ({amount(average, self.unit)}/s)" if average else ""
        self._log(f"{self.what}: done, {amount(self.done, self.unit)} in {took}{speed}", now, average)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close(finished=kind is None)


class LogHandler(logging.StreamHandler):
    """A text log handler that lifts the progress bars off a terminal while it writes a line, then redraws them."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(tqdm, "_instances", None) and shows_bars(self.stream):
            with tqdm.external_write_mode(file=self.stream):
                super().emit(record)
        else:
            super().emit(record)
