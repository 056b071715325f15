"""Step timing: the client's StepTimer, the server's aggregation and the warning's cause, on known intervals."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from sigil_feed.client import timing
from sigil_feed.client.timing import StepTimer
from sigil_feed.protos import feed_pb2
from sigil_feed.protos.constants import WAIT_BUCKETS_S
from sigil_feed.server.config import ConfigError, load_config
from sigil_feed.server.observe.input_bound import input_bound
from sigil_feed.server.observe.timing import StepStats, Window
from sigil_feed.server.observe.watch import likely_cause


def test_a_step_runs_from_batch_to_batch_and_its_wait_spans_epoch_markers(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 1.0, 3.0, 3.5, 4.0, 10.0, 10.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = StepTimer()           # 0.0: last report
    timer.waiting()               # 0.0
    timer.served()                # 1.0: the first batch only starts the clock
    timer.waiting()               # 3.0: two seconds of compute
    timer.waiting()               # (an epoch marker came back: still the same wait)
    timer.served()                # 3.5
    timer.waiting()               # 4.0
    timer.served()                # 10.0
    report = timer.report()       # 10.0
    assert report is not None and (report.steps, report.wait_s, report.step_s) == (2, 6.5, 9.0)
    assert list(report.wait_counts) == [0] * 8 + [1] + [0] * 3 + [1, 0]  # 0.5 s (<= 0.5) and 6 s (<= 10)
    assert len(report.wait_counts) == len(WAIT_BUCKETS_S) + 1


def test_reports_come_at_most_twice_a_second_and_only_with_new_steps() -> None:
    timer = StepTimer()
    assert timer.report() is None
    for _ in range(3):
        timer.waiting()
        timer.served()
    assert timer.report() is None  # too soon
    time.sleep(timing.REPORT_INTERVAL_S)
    assert timer.report().steps == 2
    time.sleep(timing.REPORT_INTERVAL_S)
    assert timer.report() is None  # nothing new


def stats(wait_s: float, step_s: float, steps: int = 10, owed_s: float = 0.0) -> StepStats:
    out = StepStats()
    out.add(feed_pb2.StepTiming(steps=steps, wait_s=wait_s, step_s=step_s, wait_counts=[steps]), owed_s=owed_s)
    return out


def test_a_group_sums_wait_and_step_time_and_names_the_rank_waiting_longest() -> None:
    view = input_bound([(0, "a", stats(1.0, 10.0)), (1, "b", stats(6.0, 10.0)), (2, "c", StepStats())])
    assert view.reported and view.fraction_1m == pytest.approx(0.35) == view.fraction_total
    assert (view.slowest_rank, view.slowest_client, view.steps) == (1, "b", 20)
    assert view.steps_per_s == pytest.approx(1.0) and view.wait_counts[0] == 20
    assert not input_bound([(0, "a", StepStats())]).reported


def test_the_cause_is_the_server_when_it_owed_the_batches_the_ranks_waited_for() -> None:
    def member(rank: int, wait: float, owed: float) -> tuple[object, Window]:
        return SimpleNamespace(client=SimpleNamespace(rank=rank)), Window(steps=10, wait_s=wait, step_s=10,
                                                                           owed_s=owed)

    assert "streaming tokenization slower" in likely_cause(False, [member(0, 5.0, 6.0)])
    assert "cannot cut batches" in likely_cause(True, [member(0, 5.0, 6.0)])
    cause = likely_cause(False, [member(0, 5.0, 6.0), member(3, 5.0, 0.1)])
    assert "rank(s) 0 batches" in cause and "rank(s) 3 had no credits outstanding" in cause


@pytest.mark.parametrize("setting", [{"threshold": 0}, {"threshold": 1.5}, {"window_s": 0}, {"window": 5}])
def test_bad_input_bound_settings_name_the_key(tmp_path, setting: dict) -> None:
    from tests.conftest import write_config

    config = write_config(tmp_path / "t.yaml", {"names": ["local:x.jsonl"]}, server={"input_bound": setting})
    with pytest.raises(ConfigError, match=r"server\.input_bound"):
        load_config(config)
