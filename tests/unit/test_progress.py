"""The progress reporter: a bar in a terminal, periodic log lines without one, only JSON lines with JSON logs."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from sigil_feed.server import progress
from sigil_feed.server.cli.logs import JsonFormatter
from sigil_feed.server.progress import LogHandler, PartMeter, Progress

GB = 1_000_000_000


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=progress.log.name)
    return caplog


def test_without_a_terminal_a_line_at_the_start_then_every_interval_with_total_rate_and_eta(
        logs: pytest.LogCaptureFixture) -> None:
    clock, stream = Clock(), io.StringIO()
    with Progress("building token store", total=int(2.9 * GB), every_s=15, clock=clock, stream=stream) as report:
        for _ in range(10):  # 10 s: no line
            clock.now += 1
            report.advance(35_000_000)
        clock.now += 20
        report.at(int(1.2 * GB))  # 30 s after the first line: 1.2 GB at 40 MB/s
        clock.now += 5
        report.at(int(1.3 * GB))  # 5 s after the last line: none
    assert logs.messages == ["building token store: 0% (0 B of 2.9 GB)",
                               "building token store: 41% (1.2 GB of 2.9 GB), 40.0 MB/s, ETA 43 s",
                               "building token store: done, 1.3 GB in 35 s (37.1 MB/s)"]
    assert stream.getvalue() == ""
    fields = logs.records[1].progress  # type: ignore[attr-defined]
    assert (fields["done"], fields["total"], fields["unit"], fields["eta_s"]) == (int(1.2 * GB), int(2.9 * GB), "B",
                                                                                 42.5)


def test_short_work_says_nothing_and_long_work_speaks_after_the_quiet_time(logs: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with Progress("fetching shard s3://b/x", total=100_000_000, after_s=3, every_s=15, clock=clock,
                  stream=io.StringIO()) as report:
        clock.now += 2.5
        report.at(100_000_000)
    assert logs.records == []

    with Progress("finding the parts of big.jsonl", total=GB, after_s=3, every_s=15, clock=clock,
                  stream=io.StringIO()) as report:
        clock.now += 4
        report.at(400_000_000)
    assert logs.messages == ["finding the parts of big.jsonl: 40% (400.0 MB of 1.0 GB), 100.0 MB/s, ETA 6.0 s",
                               "finding the parts of big.jsonl: done, 400.0 MB in 4.0 s (100.0 MB/s)"]


def test_a_failed_piece_of_work_has_no_done_line(logs: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with pytest.raises(OSError), Progress("x", total=10, every_s=0, clock=clock, stream=io.StringIO()) as report:
        clock.now += 1
        report.at(5)
        raise OSError("disk full")
    assert logs.messages == ["x: 0% (0 B of 10 B)", "x: 50% (5 B of 10 B), 5 B/s, ETA 1.0 s"]


def test_waiting_says_who_builds_every_interval_not_at_every_poll(logs: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    report = Progress("d", unit=None, after_s=15, every_s=15, clock=clock,
                      stream=io.StringIO())
    for poll in range(20):  # every 2 s, for 40 s
        clock.now += 2
        report.note(f"waiting for build by host/7 (heartbeat {poll % 5} s ago)")
    report.close()
    assert logs.messages == ["d: waiting for build by host/7 (heartbeat 2 s ago), 16 s so far",
                             "d: waiting for build by host/7 (heartbeat 0 s ago), 32 s so far", "d: waited 40 s"]


def test_in_a_terminal_a_bar_with_its_total_and_no_log_lines(logs: pytest.LogCaptureFixture) -> None:
    terminal = Terminal()
    with Progress("dataset d: tokenizing into /s", label="tokenizing d", total=2 * GB, stream=terminal) as report:
        report.at(GB)
    assert logs.records == []
    assert "\r" in terminal.getvalue() and "tokenizing d:  50%" in terminal.getvalue()
    assert "/2.00G " in terminal.getvalue()


def test_with_json_logs_a_terminal_gets_no_bar_and_each_line_is_one_json_object(
        logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_bars_allowed", False)  # what logs.configure(json_lines=True) sets
    terminal, clock = Terminal(), Clock()
    with Progress("building", total=GB, every_s=0, clock=clock, stream=terminal) as report:
        clock.now += 1
        report.at(GB // 4)
    assert terminal.getvalue() == ""
    bodies = [json.loads(JsonFormatter().format(r)) for r in logs.records]
    assert [b["msg"] for b in bodies][:2] == ["building: 0% (0 B of 1.0 GB)",
                                              "building: 25% (250.0 MB of 1.0 GB), 250.0 MB/s, ETA 3.0 s"]
    assert bodies[1]["progress"]["total"] == GB and bodies[1]["progress"]["rate_per_s"] == GB / 4


def test_disabled_shows_nothing(logs: pytest.LogCaptureFixture) -> None:
    terminal = Terminal()
    with Progress("x", total=10, every_s=0, enabled=False, stream=terminal) as report:
        report.at(5)
    assert logs.records == [] and terminal.getvalue() == ""


def test_a_text_log_line_lifts_the_bar_and_redraws_it() -> None:
    terminal = Terminal()
    handler = LogHandler(terminal)
    with Progress("x", label="tokenizing", total=10, stream=terminal) as report:
        report.at(3)
        handler.emit(logging.makeLogRecord({"msg": "a line of its own", "levelno": logging.INFO}))
        shown = terminal.getvalue()
    assert "\ra line of its own\n" in shown  # the bar was cleared first
    assert shown.rindex("tokenizing") > shown.index("a line of its own")  # and drawn again after


def test_a_build_counts_its_files_bytes_each_part_its_share_or_parts_where_nothing_has_a_size(
        tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "b").write_bytes(b"x" * 7)
    paths = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path), "owner/name"]  # a folder, a Hub name: no size
    meter = PartMeter(paths)
    assert (meter.total, meter.unit) == (17, "B")
    assert meter.shares(paths, [0, 0, 0, 1, 2, 3]) == [3, 3, 4, 7, 0, 0]  # a file's shares add up to its size
    hub = PartMeter(paths[2:])
    assert (hub.total, hub.unit, hub.shares(paths[2:], [0, 0, 1])) == (None, "parts", [1, 1, 1])


def test_counting_parts_without_a_total(logs: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with Progress("t", unit="parts", every_s=10, clock=clock, stream=io.StringIO()) as report:
        clock.now += 20
        report.advance(9)
    assert logs.messages == ["t: 0 parts", "t: 9 parts, 0.45 parts/s", "t: done, 9 parts in 20 s (0.45 parts/s)"]
