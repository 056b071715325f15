"""Mixture schedules and a new mixture on resume, end to end through Feed, in both modes.

A run whose `dataset_weights` and `task_weights` are schedules over epochs is stopped after any step on w1 ranks
and resumed from one rank's cursor on w2 ranks under another configured mixture (weights and task weights
changed, schedules added or removed): the epoch it stopped in continues exactly as the uninterrupted run serves
it (the cursor carries its mixture: nothing served twice, nothing skipped), and every later epoch is the new
configuration's, as a run of it from the start serves it. Each epoch is the one a constant mixture of the
schedule's weights for that epoch serves, so every row follows the mixture in force in its epoch."""

from __future__ import annotations

import re
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil_feed.server.cached.packer import CachedPacker
from sigil_feed.server.cached.segments import served_counts
from sigil_feed.server.config import parse_config
from sigil_feed.server.errors import ConfigError, Refused
from sigil_feed.server.feed.batches import Feed
from sigil_feed.server.feed.cursor import decode_cursor
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.pipeline.schedule import Phase, next_change, weights_at
from sigil_feed.server.rows.deal import Deal
from sigil_feed.server.runtime import Runtime
from tests.conftest import TOKENIZER_DIR, write_jsonl
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)
from tests.unit.test_elastic import SEQ_LEN, STEP_ROWS, WORLDS, Step, global_steps, record

EPOCHS = 3
WEIGHTS = (0.5, 1.0, 2.0, 3.0)


def write_sources(root: Path, files: tuple[tuple[int, ...], ...]) -> list[str]:
    names, first = [], 0
    for s, sizes in enumerate(files):
        for f, size in enumerate(sizes):
            write_jsonl(root / f"src{s}" / f"part{f}.jsonl", [record(first + i) for i in range(size)])
            first += size
        names.append(f"local:{root / f'src{s}'}/*.jsonl")
    return names


def make_dataset(root: Path, names: list[str], runtime: Runtime, *, cached: bool, pack: bool,
                 dataset_weights: Any, task_weights: Any, **more: Any) -> ServedDataset:
    section: dict[str, Any] = {
        "names": names, "use_cache": cached, "cache_dir": str(root / "cache"), "shuffle_seed": 5, "shuffle_block": 7,
        "remainder": "keep", "epochs": EPOCHS, "interleave_mode": "weighted", "stopping_strategy": "all_exhausted",
        "virtual_ranks": 2, "shuffle_window_shards": 2, "dataset_weights": dataset_weights,
        "task_weights": task_weights, **more}
    raw = {"model_name": str(TOKENIZER_DIR), "max_seq_len": SEQ_LEN, "pack": pack, "dataset": section}
    dataset = ServedDataset(parse_config(raw, "test.yaml", root).datasets["default"], "test.yaml", encoder(),
                            runtime=runtime)
    dataset.prepare(show_bar=False)
    return dataset


def schedules(sources: int) -> st.SearchStrategy[Any]:
    """A source-weights setting for `sources` sources: none, a mapping, or phases (some ramped) over the epochs."""
    mapping = st.lists(st.sampled_from(WEIGHTS), min_size=sources, max_size=sources)
    phase_starts = st.lists(st.integers(1, EPOCHS - 1), max_size=2, unique=True).map(sorted)
    return st.one_of(st.none(), mapping.map(lambda w: ("map", w)),
                     st.tuples(phase_starts, st.lists(mapping, min_size=3, max_size=3), st.booleans())
                     .map(lambda t: ("phases", t)))


def weights_setting(drawn: Any, names: list[str]) -> Any:
    if drawn is None:
        return None
    kind, value = drawn
    if kind == "map":
        return dict(zip(names, value, strict=True))
    starts, weights, ramp = value
    phases = [{"from_epoch": 0, "weights": dict(zip(names, weights[0], strict=True))}]
    for i, start in enumerate(starts):
        phases.append({"from_epoch": start, "weights": dict(zip(names, weights[i + 1], strict=True))})
    if ramp and len(phases) == 2 and phases[1]["from_epoch"] == 1:
        phases[1]["ramp_epochs"] = 2  # epoch 1 halfway, epoch 2 there
    return phases


task_settings = st.sampled_from([None, {"explain": 2.0}, [{"from_epoch": 0, "weights": {"explain": 0.5}},
                                                           {"from_epoch": 2, "weights": {"explain": 3.0}}]])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.lists(st.integers(3, 25), min_size=1, max_size=2).map(tuple), min_size=2, max_size=3)
       .map(tuple), cached=st.booleans(), pack=st.booleans(), drawn=st.data(), w1=st.sampled_from(WORLDS),
       w2=st.sampled_from(WORLDS), stop=st.integers(0, 60), again=st.integers(0, 60),
       stopping=st.sampled_from(["first_exhausted", "all_exhausted"]))
def test_a_scheduled_run_resumed_under_a_new_mixture_serves_nothing_twice_and_resumes_exactly(
        runtime: Runtime, files: tuple[tuple[int, ...], ...], cached: bool, pack: bool, drawn: st.DataObject,
        w1: int, w2: int, stop: int, again: int, stopping: str) -> None:
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_sources(root, files)
        old = {"dataset_weights": weights_setting(drawn.draw(schedules(len(names))), names),
               "task_weights": drawn.draw(task_settings), "stopping_strategy": stopping}
        new = {"dataset_weights": weights_setting(drawn.draw(schedules(len(names))), names),
               "task_weights": drawn.draw(task_settings), "stopping_strategy": stopping}
        dataset = make_dataset(root, names, runtime, cached=cached, pack=pack, **old)
        full, cursors = global_steps(dataset, w1)
        assert full
        stop %= len(full)
        epoch = full[stop][0]

        # every epoch is what a constant mixture of that epoch's scheduled weights serves
        for e in range(EPOCHS):
            mixture = dataset.mixtures.at(e)
            constant = make_dataset(root, names, runtime, cached=cached, pack=pack, stopping_strategy=stopping,
                                    dataset_weights=dict(zip(names, mixture.weights, strict=True)),
                                    task_weights=mixture.task_weights)
            assert _epoch(global_steps(constant, w1)[0], e) == _epoch(full, e)

        # stopped after step `stop` and resumed on w2 ranks under the new configuration
        changed = make_dataset(root, names, runtime, cached=cached, pack=pack, **new)
        resumed, later_cursors = global_steps(changed, w2, cursors[stop])
        new_run, _ = global_steps(changed, w2)
        if changed.mixtures.at(epoch) == dataset.mixtures.at(epoch):  # the same mixture: the same epoch
            assert _epoch(resumed, epoch) == _epoch(full[stop + 1:], epoch)
        elif _epoch(full[stop + 1:], epoch):
            assert any(f"epoch {epoch} from " in change for change in changed.mixtures.changes)
        else:  # stopped after the epoch's last step: the new mixture does not lengthen it
            assert not _epoch(resumed, epoch)
        assert [step for step in resumed if step[0] > epoch] == [step for step in new_run if step[0] > epoch]
        if resumed:  # the epoch's plan travels in the cursor: resumed again, on w1 ranks, it continues exactly
            again %= len(resumed)
            assert global_steps(changed, w1, later_cursors[again])[0] == resumed[again + 1:]

        # within the epoch, no sample twice (one sample per row, no task weight copies, no source restarted)
        tasks = [m.task_weights or {} for m in (dataset.mixtures.at(epoch), changed.mixtures.at(epoch))]
        if not pack and stopping == "first_exhausted" and all(w <= 1 for t in tasks for w in t.values()):
            served = [row for step in _epoch(full[:stop + 1], epoch) + _epoch(resumed, epoch) for row in step[2]]
            assert len(served) == len(set(served))


def test_rows_after_a_resume_follow_the_new_mixture(tmp_path: Path, runtime: Runtime) -> None:
    """Both modes: resumed mid-epoch with source 0 weighed down to almost nothing, the rest of the epoch is
    (almost) all source 1, and none of it was served before the resume."""
    names = write_sources(tmp_path, ((40,), (40,)))
    for cached in (True, False):
        common = {"cached": cached, "pack": False, "task_weights": None, "stopping_strategy": "first_exhausted",
                  "remainder": "keep"}
        only0 = make_dataset(tmp_path, names[:1], runtime, dataset_weights=None, **common)
        source0 = {row for step in global_steps(only0, 1)[0] if step[0] == 0 for row in step[2]}
        even = make_dataset(tmp_path, names, runtime, dataset_weights=None, **common)
        full, cursors = global_steps(even, 2)
        before = [row for step in full[:2] for row in step[2]]
        assert 6 < sum(row in source0 for row in before) < 18
        skewed = make_dataset(tmp_path, names, runtime, dataset_weights={names[0]: 0.001, names[1]: 3.0}, **common)
        after = [row for step in global_steps(skewed, 3, cursors[1])[0] if step[0] == 0 for row in step[2]]
        assert len(after) > 15 and sum(row in source0 for row in after) <= 2 and not set(after) & set(before)


def test_a_task_weight_changed_on_resume_while_a_records_copies_are_yielded_resumes_again_exactly(
        runtime: Runtime) -> None:
    """Streaming: epoch 2's task weight explain=3 gives way to none from shuffle block 4 on resume, while a source
    not drawn since block 3 is between the copies of a record. Resumed again from a later cursor, the epoch goes on
    with exactly the rows of the first resume (the pending copies follow the weights in force, both ways). Found by
    the property test above."""
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_sources(root, ((13,), (8,), (8,)))
        tasks = [{"from_epoch": 0, "weights": {"explain": 0.5}}, {"from_epoch": 2, "weights": {"explain": 3.0}}]
        dataset = make_dataset(root, names, runtime, cached=False, pack=True, dataset_weights=None,
                               task_weights=tasks, stopping_strategy="first_exhausted")
        full, cursors = global_steps(dataset, 1)
        changed = make_dataset(root, names, runtime, cached=False, pack=True, task_weights=None,
                               dataset_weights=dict(zip(names, [0.5, 0.5, 1.0], strict=True)),
                               stopping_strategy="first_exhausted")
        assert full[8][:2] == (2, 24)
        resumed, later = global_steps(changed, 1, cursors[8])
        assert resumed and any("epoch 2 from shuffle block 4" in change for change in changed.mixtures.changes)
        for i in range(len(resumed)):
            assert global_steps(changed, 1, later[i])[0] == resumed[i + 1:]


def _epoch(steps: list[Step], epoch: int) -> list[Step]:
    return [step for step in steps if step[0] == epoch]


def test_schedules_hold_phases_and_ramp_linearly() -> None:
    phases = [Phase(from_epoch=0, weights={"a": 1.0, "b": 1.0}),
              Phase(from_epoch=2, weights={"a": 4.0}, ramp_epochs=3),
              Phase(from_epoch=6, weights={"b": 2.0})]
    assert [weights_at(phases, e) for e in (0, 1)] == [{"a": 1.0, "b": 1.0}] * 2
    assert weights_at(phases, 2) == {"a": 2.0, "b": 1.0}  # a third of the way to a=4 (b: absent is 1.0)
    assert weights_at(phases, 3) == {"a": 3.0, "b": 1.0}
    assert weights_at(phases, 4) == weights_at(phases, 5) == {"a": 4.0}
    assert weights_at(phases, 9) == {"b": 2.0}
    assert [next_change(phases, e) for e in (0, 2, 4, 5, 6)] == [2, 3, 6, 6, None]
    assert weights_at({"a": 2.0}, 7) == {"a": 2.0} and next_change({"a": 2.0}, 0) is None


@pytest.mark.parametrize(("weights", "message"), [
    ([{"from_epoch": 1, "weights": {"a": 1}}], "from_epoch: 0"),
    ([{"from_epoch": 0, "weights": {"a": 1}}, {"from_epoch": 0, "weights": {"a": 2}}], "rise strictly"),
    ([{"from_epoch": 0, "weights": {"a": 1}}, {"from_epoch": 1, "weights": {"a": 2}, "ramp_epochs": 3},
      {"from_epoch": 2, "weights": {"a": 1}}], "runs past epoch 2"),
    ([{"from_epoch": 0, "weights": {"a": 1}, "ramp_epochs": 2}], "nothing to ramp from"),
    ([{"from_epoch": 0, "weights": {"a": 0}}], "greater than 0"),
    ([{"from_epoch": 0, "weight": {"a": 1}}], "weight"),
])
def test_a_bad_schedule_fails_at_start_naming_the_key(tmp_path: Path, weights: Any, message: str) -> None:
    raw = {"model_name": "t", "dataset": {"names": ["local:x"], "dataset_weights": weights}}
    with pytest.raises(ConfigError, match="dataset_weights") as err:
        parse_config(raw, "trainer.yaml", tmp_path)
    assert message in str(err.value)


def test_plain_mappings_keep_working_and_a_schedule_naming_no_source_fails(tmp_path: Path,
                                                                          runtime: Runtime) -> None:
    names = write_sources(tmp_path, ((5,), (6,)))
    plain = make_dataset(tmp_path, names, runtime, cached=True, pack=True, dataset_weights={names[0]: 2.0},
                         task_weights={"explain": 1.5})
    assert plain.mixtures.at(0).weights == plain.mixtures.at(5).weights == (2.0, 1.0)
    assert plain.mixtures.at(3).task_weights == {"explain": 1.5}
    with pytest.raises(ConfigError, match=r"dataset.dataset_weights.*local:nope"):
        make_dataset(tmp_path, names, runtime, cached=True, pack=True, task_weights=None,
                     dataset_weights=[{"from_epoch": 0, "weights": {names[0]: 1.0}},
                                      {"from_epoch": 1, "weights": {"local:nope": 1.0}}])


def test_a_new_mixture_is_accepted_on_resume_but_other_filters_are_refused(tmp_path: Path,
                                                                          runtime: Runtime) -> None:
    names = write_sources(tmp_path, ((9,), (12,)))
    dataset = make_dataset(tmp_path, names, runtime, cached=False, pack=True, dataset_weights=None,
                           task_weights=None)
    item = next(Feed(dataset, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=None))
    reweighted = make_dataset(tmp_path, names, runtime, cached=False, pack=True, task_weights={"explain": 2.0},
                              dataset_weights={names[1]: 3.0})
    assert reweighted.fingerprint == dataset.fingerprint
    start = decode_cursor(item.cursor, fingerprint=reweighted.fingerprint, seq_len=SEQ_LEN)
    assert start.mixture is not None and [(m.at, m.w) for m in start.mixture] == [(0, [1.0, 1.0])]  # by position
    Feed(reweighted, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=start)
    (change,) = reweighted.mixtures.changes
    assert re.match(r"epoch 0 from shuffle block \d+: ", change) and f"{names[1]}=3; tasks: explain=2" in change
    filtered = make_dataset(tmp_path, names, runtime, cached=False, pack=True, dataset_weights=None,
                            task_weights=None, min_length=80)
    with pytest.raises(Refused, match="another dataset configuration"):
        decode_cursor(item.cursor, fingerprint=filtered.fingerprint, seq_len=SEQ_LEN)
    fewer = make_dataset(tmp_path, names[:1], runtime, cached=False, pack=True, dataset_weights=None,
                         task_weights=None)
    inside = decode_cursor(item.cursor, fingerprint=fewer.fingerprint, seq_len=SEQ_LEN)  # a source removed
    Feed(fewer, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=inside)  # (test_sources_change)
    assert any("sources now" in change for change in fewer.mixtures.changes)


@pytest.mark.parametrize("pack", [True, False])
def test_served_counts_are_the_samples_the_rows_before_a_segment_hold(tmp_path: Path, runtime: Runtime,
                                                                      pack: bool) -> None:
    """What a new segment leaves out is exactly what the rows before it hold, in whole or in part: the samples
    the packer cuts those rows from."""
    names = write_sources(tmp_path, ((17, 9), (23,)))
    dataset = make_dataset(tmp_path, names, runtime, cached=True, pack=pack, dataset_weights=None,
                           task_weights={"explain": 2.0}, virtual_ranks=4)
    assert dataset.layouts is not None and dataset.store is not None
    layout = dataset.layouts[0]
    packer = CachedPacker(dataset.store, layout, Deal(0, 1, 1, layout.virtual), seq_len=SEQ_LEN, pack=pack,
                          completion_only=False, pad_id=0, remainder="keep")
    for rows in range(packer.total + 1):
        v, i = packer._locate(np.arange(rows))
        items = np.unique(packer._runs(v, i)[1]) if pack else packer.first[v] + i  # an item cut across rows: once
        expected = np.bincount(layout.items[items], minlength=len(dataset.store.lengths))
        got = served_counts(dataset.store, layout, rows, seq_len=SEQ_LEN, pack=pack)
        assert got.tolist() == expected.tolist(), rows
