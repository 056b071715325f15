"""Mixture schedules with phases that start at a global row inside an epoch (`from_row`, cached mode).

A phase from row R of epoch E changes the mixture at that row for every rank, world size and resume: the rows
before it are the epoch's rows under the mixture before (as a constant config of it serves them), the rows from
it on are laid out from what those left unserved, and a window across R takes its rows on each side from the
mixture in force there. An uninterrupted run equals one stopped after any step and resumed on another world size,
batch for batch; within an epoch nothing is served twice. Streaming mode: test_schedule_rows_streaming.py."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil_feed.server.config import parse_config
from sigil_feed.server.errors import ConfigError
from sigil_feed.server.feed.mixtures import Mixture, plan_at
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.pipeline.schedule import Phase, next_change, weights_at
from sigil_feed.server.runtime import Runtime
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)
from tests.unit.test_elastic import SEQ_LEN, STEP_ROWS, WORLDS, Step, global_steps
from tests.unit.test_mixture_schedules import EPOCHS, WEIGHTS, make_dataset, write_sources


def epoch_rows(steps: list[Step], epoch: int) -> dict[int, str]:
    """The epoch's rows served by `steps`: global row -> row hash."""
    return {start + k: digest for e, start, rows in steps if e == epoch for k, digest in enumerate(rows)}


def padded_hashes(dataset: ServedDataset) -> list[str]:
    """Each store sample's row hash when it is served padded (one sample per row; as test_elastic.row_hashes)."""
    assert dataset.layouts is not None
    store = dataset.layouts.store
    hashes = []
    with store.shards.pinned(sorted(set(store.shard.tolist()))) as tokens:
        for shard, offset, length in zip(store.shard.tolist(), store.offsets.tolist(), store.lengths.tolist(),
                                         strict=True):
            kept = min(length, SEQ_LEN)
            ids = np.full(SEQ_LEN, dataset.facts.pad_id, dtype=np.dtype(store.manifest.dtype))
            ids[:kept] = tokens[shard][offset:offset + kept]
            hashes.append(hashlib.blake2b(ids.tobytes() + repr([kept]).encode(), digest_size=8).hexdigest())
    assert len(set(hashes)) == len(hashes)
    return hashes


def segment_samples(dataset: ServedDataset, rows: dict[int, str], start: int, mixture: Mixture) -> list[str]:
    """The row hashes of the samples a segment from `start` under `mixture` lays out: the mixture's served sequence
    less the samples the epoch's rows before `start` hold."""
    assert dataset.layouts is not None
    hashes = padded_hashes(dataset)
    index = {h: i for i, h in enumerate(hashes)}
    served = np.bincount([index[h] for r, h in rows.items() if r < start], minlength=len(hashes))
    return [hashes[i] for i in dataset.layouts.sequences(mixture, served).tolist()]


def phase_list(names: list[str], first: list[float], later: list[tuple[int, int, list[float]]]) -> list[dict[str, Any]]:
    """A schedule from epoch 0 under `first`, then a phase per (epoch, row, weights), sorted and distinct."""
    phases = [{"from_epoch": 0, "weights": dict(zip(names, first, strict=True))}]
    for (epoch, row), weights in sorted({(e, r): w for e, r, w in later}.items()):
        phases.append({"from_epoch": epoch, "from_row": row, "weights": dict(zip(names, weights, strict=True))})
    return phases


PHASE_RUNS: dict[str, Any] = dict(
    files=st.lists(st.lists(st.integers(3, 25), min_size=1, max_size=2).map(tuple), min_size=2, max_size=3)
    .map(tuple), pack=st.booleans(), drawn=st.data(), w1=st.sampled_from(WORLDS), w2=st.sampled_from(WORLDS),
    stop=st.integers(0, 60), remainder=st.sampled_from(["keep", "drop", "pad"]),
    stopping=st.sampled_from(["first_exhausted", "all_exhausted"]))
"""What the property tests of phases by row draw (both modes): corpora, layouts, stops, `remainder`, stopping."""


def draw_schedules(drawn: st.DataObject, names: list[str], *, explain_later: float
                   ) -> tuple[st.SearchStrategy[list[float]], list[float], list[tuple[int, int, list[float]]], Any]:
    """Source weights for `names` (the strategy, the first phase's, later phases' (epoch, row, weights)) and task
    weights (None, or `explain` at 0.5 then `explain_later` from row 29)."""
    weights = st.lists(st.sampled_from(WEIGHTS), min_size=len(names), max_size=len(names))
    first = drawn.draw(weights)
    later = drawn.draw(st.lists(st.tuples(st.integers(0, EPOCHS - 1), st.integers(1, 70), weights),
                                min_size=1, max_size=3))
    tasks = drawn.draw(st.sampled_from([None, [{"from_epoch": 0, "weights": {"explain": 0.5}},
                                               {"from_epoch": 0, "from_row": 29,
                                                "weights": {"explain": explain_later}}]]))
    return weights, first, later, tasks


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**PHASE_RUNS)
def test_phases_inside_an_epoch_change_the_mixture_at_their_row_for_every_world_size_and_resume(
        runtime: Runtime, files: tuple[tuple[int, ...], ...], pack: bool, drawn: st.DataObject, w1: int, w2: int,
        stop: int, remainder: str, stopping: str) -> None:
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_sources(root, files)
        weights, first, later, tasks = draw_schedules(drawn, names, explain_later=1.0)
        common: dict[str, Any] = {"cached": True, "pack": pack, "remainder": remainder, "stopping_strategy": stopping}
        dataset = make_dataset(root, names, runtime, dataset_weights=phase_list(names, first, later),
                               task_weights=tasks, **common)
        full, cursors = global_steps(dataset, w1)
        if not full:  # `drop` and an epoch of less than one window: nothing to serve
            return

        # every world size serves the same rows; stopped after any step and resumed on another, the same again
        assert global_steps(dataset, w2)[0] == full
        stop %= len(full)
        resumed, again = global_steps(dataset, w2, cursors[stop])
        assert resumed == full[stop + 1:]
        if resumed:
            assert global_steps(dataset, w1, again[len(again) // 2])[0] == resumed[len(again) // 2 + 1:]

        for e in range(EPOCHS):
            rows = epoch_rows(full, e)
            inside = dataset.mixtures.rows_inside(e)
            # the rows before the epoch's first change are the constant mixture's of its start
            mixture = dataset.mixtures.at(e)
            constant = make_dataset(root, names, runtime, dataset_weights=dict(zip(names, mixture.weights,
                                                                                   strict=True)),
                                    task_weights=mixture.task_weights, **common)
            constant_steps = global_steps(constant, w1)[0]
            before = epoch_rows(constant_steps, e)
            if remainder == "pad":  # the last window's rows past the epoch's end wrap around: not the same rows
                before = {r: h for r, h in before.items() if r < max(s for x, s, _ in constant_steps if x == e)}
            cut = inside[0] if inside else max([*rows, *before], default=0) + 1
            both = [r for r in rows if r in before and r < cut]
            assert [rows[r] for r in both] == [before[r] for r in both]
            assert len(both) >= min(cut, len(before), len(rows)) - STEP_ROWS  # all but `drop`'s last window
            # padded, every row of a segment is a sample of its mixture's sequence less what the rows before held
            plan = dataset.mixtures.plan(e)
            if not pack and remainder == "keep":
                for k, (start, mixture) in enumerate(plan[1:], start=1):
                    end = plan[k + 1][0] if k + 1 < len(plan) else None
                    got = Counter(h for r, h in rows.items() if start <= r and (end is None or r < end))
                    expected = Counter(segment_samples(dataset, rows, start, mixture))
                    assert got == expected if end is None and got else not got - expected
            # nothing served twice in the epoch (one sample per row, no copies, no source restarted)
            if not pack and remainder != "pad" and stopping == "first_exhausted" and \
                    all(w <= 1 for _, m in plan for w in (m.task_weights or {}).values()):
                assert len(set(rows.values())) == len(rows)

        # resumed under another schedule by row: the stopped epoch keeps its rows served and takes the new phases
        # after the resumed row; resumed again anywhere on w1 it continues exactly; later epochs are the new run's
        moved = drawn.draw(st.lists(st.tuples(st.integers(0, EPOCHS - 1), st.integers(1, 70), weights),
                                    max_size=3))
        changed = make_dataset(root, names, runtime, dataset_weights=phase_list(names, first, moved),
                               task_weights=tasks, **common)
        epoch, at = full[stop][0], full[stop][1] + STEP_ROWS
        resumed, again = global_steps(changed, w2, cursors[stop])
        new_run = global_steps(changed, w2)[0]
        assert [s for s in resumed if s[0] > epoch] == [s for s in new_run if s[0] > epoch]
        if resumed:
            half = len(again) // 2
            assert global_steps(changed, w1, again[half])[0] == resumed[half + 1:]
        plan, before_plan = changed.mixtures.plan(epoch), dataset.mixtures.plan(epoch)
        if plan_at(plan, at) == plan_at(before_plan, at) and \
                [x for x in plan if x[0] > at] == [x for x in before_plan if x[0] > at]:  # the same from `at` on
            assert [s for s in resumed if s[0] == epoch] == [s for s in full[stop + 1:] if s[0] == epoch]
        served = {**epoch_rows(full[:stop + 1], epoch), **epoch_rows(resumed, epoch)}
        if not pack and remainder != "pad" and stopping == "first_exhausted" and tasks is None:
            assert len(set(served.values())) == len(served)  # nothing twice in the epoch across the resume


def test_rows_from_a_phase_row_follow_its_mixture_and_equal_a_resume_there(tmp_path: Path,
                                                                           runtime: Runtime) -> None:
    """A phase from row 17 (inside a window of 12 rows) weighing source 0 down to almost nothing: rows 0-16 are the
    even mixture's, rows 17 on (almost) all source 1 and none served before; a phase from row 24 (a window's start)
    serves what a run stopped there and resumed under the new weights serves."""
    names = write_sources(tmp_path, ((40,), (40,)))
    common: dict[str, Any] = {"cached": True, "pack": False, "task_weights": None,
                              "stopping_strategy": "first_exhausted"}
    only0 = make_dataset(tmp_path, names[:1], runtime, dataset_weights=None, **common)
    source0 = set(epoch_rows(global_steps(only0, 1)[0], 0).values())
    even = make_dataset(tmp_path, names, runtime, dataset_weights=None, **common)
    even_steps, cursors = global_steps(even, 2)
    even_rows = epoch_rows(even_steps, 0)
    skewed = {names[0]: 0.001, names[1]: 3.0}
    resumed = make_dataset(tmp_path, names, runtime, dataset_weights=skewed, **common)
    for at in (17, 24):
        phased = make_dataset(tmp_path, names, runtime, **common, dataset_weights=[
            {"from_epoch": 0, "weights": {}}, {"from_epoch": 0, "from_row": at, "weights": skewed}])
        steps = global_steps(phased, 3)[0]
        rows = epoch_rows(steps, 0)
        assert {r: h for r, h in rows.items() if r < at} == {r: h for r, h in even_rows.items() if r < at}
        after = [h for r, h in rows.items() if r >= at]
        assert len(after) > 15 and sum(h in source0 for h in after) <= 2
        assert not set(after) & {h for r, h in rows.items() if r < at}
        assert epoch_rows(steps, 1) == epoch_rows(global_steps(resumed, 2)[0], 1)  # the phase holds on
    assert [s for s in global_steps(resumed, 3, cursors[1])[0] if s[0] == 0] == [s for s in steps if s[0] == 0 and
                                                                                s[1] >= 24]


def test_a_resume_under_another_schedule_keeps_the_rows_served_and_takes_its_later_phases(
        tmp_path: Path, runtime: Runtime) -> None:
    """A cursor carries its epoch's plan with the phases still ahead of it; resumed under a schedule whose phase
    inside the epoch moved, the rows before the resume are as served and the rest follow the new schedule."""
    names = write_sources(tmp_path, ((30,), (30,)))
    common: dict[str, Any] = {"cached": True, "pack": True, "task_weights": None}
    a, b = {names[0]: 3.0}, {names[1]: 3.0}

    def schedule(row: int) -> list[dict[str, Any]]:
        return [{"from_epoch": 0, "weights": a}, {"from_epoch": 0, "from_row": row, "weights": b}]

    early, late = (make_dataset(tmp_path, names, runtime, dataset_weights=schedule(row), **common)
                   for row in (40, 30))
    cursors = global_steps(early, 4)[1]
    moved = global_steps(late, 2)[0]
    resumed = global_steps(late, 2, cursors[0])[0]  # after rows 0-11: the phase at 30 applies
    assert [s for s in resumed if s[0] == 0] == [s for s in moved if s[0] == 0 and s[1] >= 12]
    assert any("epoch 0 from row 12: " in c and "then from row 30" in c for c in late.mixtures.changes)
    same = global_steps(late, 3, global_steps(late, 4)[1][3])[0]  # the same schedule: no change, nothing logged
    assert same == moved[4:] and len(late.mixtures.changes) == 1


def test_phases_by_row_hold_and_count_as_changes() -> None:
    phases = [Phase(from_epoch=0, weights={"a": 1.0}), Phase(from_epoch=1, from_row=100, weights={"a": 2.0}),
              Phase(from_epoch=3, weights={"a": 5.0}, ramp_epochs=2)]
    assert weights_at(phases, 1) == {"a": 1.0} and weights_at(phases, 1, 99) == {"a": 1.0}
    assert weights_at(phases, 1, 100) == weights_at(phases, 2) == {"a": 2.0}
    assert weights_at(phases, 3) == {"a": 3.5} and weights_at(phases, 4, 7) == {"a": 5.0}
    assert [next_change(phases, e) for e in (0, 1, 2, 3, 4)] == [1, 3, 3, 4, None]


@pytest.mark.parametrize(("weights", "message"), [
    ([{"from_epoch": 0, "from_row": 5, "weights": {"a": 1}}], "from_row: 0"),
    ([{"from_epoch": 0, "weights": {"a": 1}}, {"from_epoch": 1, "from_row": 8, "weights": {"a": 2}},
      {"from_epoch": 1, "from_row": 8, "weights": {"a": 3}}], "epoch 1 row 8 then epoch 1 row 8"),
    ([{"from_epoch": 0, "weights": {"a": 1}}, {"from_epoch": 1, "from_row": 8, "weights": {"a": 2},
                                                "ramp_epochs": 2}], "ramps by whole epochs"),
    ([{"from_epoch": 0, "weights": {"a": 1}}, {"from_epoch": 1, "from_row": -1, "weights": {"a": 2}}],
     "from_row"),
])
def test_a_bad_phase_by_row_fails_at_start_naming_the_key(tmp_path: Path, weights: Any, message: str) -> None:
    raw = {"model_name": "t", "dataset": {"names": ["local:x"], "dataset_weights": weights}}
    with pytest.raises(ConfigError, match="dataset_weights") as err:
        parse_config(raw, "trainer.yaml", tmp_path)
    assert message in str(err.value)
