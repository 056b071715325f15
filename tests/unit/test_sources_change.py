"""Sources added to or removed from `names`, through Feed. At an epoch boundary, in both modes: a cursor at an epoch's
end (the end-of-epoch item's, or the last step's, of any rank and world size) resumes under the
new list, and every later epoch is exactly what a run of the new configuration serves. Inside an epoch, cached
mode: the rest of the epoch follows the new list from the resumed row, on any world size, a source added starts
at its first sample, one removed is no longer drawn and keeps its progress (back later in the epoch, it continues
where it was), and no sample served in the epoch is served again while unserved ones of its source remain;
streaming mode likewise from the next shuffle block not yet begun (the block in progress is finished under the
list it was drawn from), and refuses what it cannot continue (sequential mixing, a source's files changed)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sigil_feed.server.errors import Refused
from sigil_feed.server.feed import stream_sources
from sigil_feed.server.feed.batches import Feed
from sigil_feed.server.feed.cursor import decode_cursor
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.runtime import Runtime
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)
from tests.unit.test_elastic import SEQ_LEN, STEP_ROWS, WORLDS, Step, global_steps, record
from tests.unit.test_mixture_schedules import WEIGHTS, make_dataset, write_sources


def epoch_end_cursor(dataset: ServedDataset, epoch: int) -> bytes:
    """The cursor of the end-of-epoch item of `epoch` (one rank taking whole steps)."""
    feed = Feed(dataset, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=None)
    return next(item.cursor for item in feed if item.rows is None and item.epoch == epoch)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.lists(st.integers(3, 20), min_size=1, max_size=2).map(tuple), min_size=3, max_size=3)
       .map(tuple), cached=st.booleans(), pack=st.booleans(), w1=st.sampled_from(WORLDS),
       w2=st.sampled_from(WORLDS), before=st.sets(st.integers(0, 2), min_size=1),
       after=st.sets(st.integers(0, 2), min_size=1))
def test_sources_change_at_an_epoch_boundary(
        runtime: Runtime, files: tuple[tuple[int, ...], ...], cached: bool, pack: bool, w1: int, w2: int,
        before: set[int], after: set[int]) -> None:
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_sources(root, files)
        common = {"cached": cached, "pack": pack, "dataset_weights": None, "task_weights": None}
        old = make_dataset(root, [names[i] for i in sorted(before)], runtime, **common)
        new = make_dataset(root, [names[i] for i in sorted(after)], runtime, **common)
        steps, cursors = global_steps(old, w1)
        fresh = global_steps(new, w2)[0]
        assert old.fingerprint == new.fingerprint  # the source list is not in the cursors' fingerprint

        resumed = global_steps(new, w2, epoch_end_cursor(old, 0))[0]
        assert resumed == [step for step in fresh if step[0] >= 1]
        last = max(i for i, step in enumerate(steps) if step[0] == 0)
        start = decode_cursor(cursors[last], fingerprint=new.fingerprint, seq_len=SEQ_LEN)
        assert start.ended  # the last step's cursor is at the epoch's end too (streaming: the stream's end was read)
        assert global_steps(new, w2, cursors[last])[0] == resumed


VIRTUAL = 2  # make_dataset's virtual ranks


def source_rows(root: Path, name: str, runtime: Runtime, **common: Any) -> set[str]:
    """The row hashes of one source's samples (one row each: padded rows, no task weight copies)."""
    alone = make_dataset(root, [name], runtime, **common)
    return {row for step in global_steps(alone, 1)[0] if step[0] == 0 for row in step[2]}


def epoch_rows(steps: list[Step]) -> list[str]:
    return [row for step in steps if step[0] == 0 for row in step[2]]


Check = Callable[[list[str], list[str], list[set[str]], set[int], set[int], str], None]
"""What an epoch serves after a resume under other sources: (served before, served after, each source's row
hashes, the sources before, the sources after, stopping_strategy)."""


def swap_and_come_back(root: Path, names: list[str], runtime: Runtime, common: dict[str, Any], *, before: set[int],
                       after: set[int], weights: list[float] | None, worlds: tuple[int, int, int], stop: int,
                       again: int, check: Check, change: str, fresh_world: int) -> None:
    """Stop epoch 0 under the `before` sources on worlds[0] ranks, resume under `after` (with `weights`) on
    worlds[1]: the log names the `change`, later epochs are a fresh run's (on `fresh_world` ranks), padded rows pass
    `check`, and a stop of the resumed run goes on exactly on worlds[2]; then stop again and resume under `before`
    on worlds[2] (a removed source comes back), its later epochs the first run's."""
    w1, w2, w3 = worlds
    pack = common["pack"]
    exhausted = common["stopping_strategy"]
    rows = [source_rows(root, name, runtime, **{**common, "pack": False}) for name in names]
    old = make_dataset(root, [names[i] for i in sorted(before)], runtime, **common)
    kept = [names[i] for i in sorted(after)]
    new = make_dataset(root, kept, runtime, **{**common, "dataset_weights": None if weights is None else
                                               {name: weights[i] for i, name in enumerate(kept)}})
    steps, cursors = global_steps(old, w1)
    inside = [i for i, step in enumerate(steps) if step[0] == 0][:-1]  # cursors before the epoch's last step
    if not inside:
        return
    stop = inside[stop % len(inside)]
    served = epoch_rows(steps[:stop + 1])
    resumed, cursors2 = global_steps(new, w2, cursors[stop])
    assert any(change in accepted for accepted in new.mixtures.changes)
    assert [step for step in resumed if step[0] >= 1] == [step for step in global_steps(new, fresh_world)[0]
                                                           if step[0] >= 1]
    if not pack:
        check(served, epoch_rows(resumed), rows, before, after, exhausted)
    assert global_steps(new, w3, cursors2[again % len(cursors2)])[0] == resumed[again % len(cursors2) + 1:]

    inside2 = [i for i, step in enumerate(resumed) if step[0] == 0][:-1]
    if not inside2:
        return
    stop2 = inside2[again % len(inside2)]
    served2 = served + epoch_rows(resumed[:stop2 + 1])
    back = global_steps(old, w3, cursors2[stop2])[0]  # `before` again: a removed source comes back
    assert [step for step in back if step[0] >= 1] == [step for step in steps if step[0] >= 1]
    if not pack:
        check(served2, epoch_rows(back), rows, before | after, before, exhausted)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.lists(st.integers(4, 16), min_size=1, max_size=2).map(tuple), min_size=3, max_size=3)
       .map(tuple), w1=st.sampled_from(WORLDS), w2=st.sampled_from(WORLDS), w3=st.sampled_from(WORLDS),
       before=st.sets(st.integers(0, 2), min_size=1), after=st.sets(st.integers(0, 2), min_size=1),
       stop=st.integers(0, 30), again=st.integers(0, 30), pack=st.booleans(),
       exhausted=st.sampled_from(["first_exhausted", "all_exhausted"]),
       weights=st.none() | st.lists(st.sampled_from(WEIGHTS), min_size=3, max_size=3))
def test_sources_added_or_removed_inside_an_epoch_serve_nothing_twice(
        runtime: Runtime, files: tuple[tuple[int, ...], ...], w1: int, w2: int, w3: int, before: set[int],
        after: set[int], stop: int, again: int, pack: bool, exhausted: str, weights: list[float] | None) -> None:
    """Cached mode: stopped inside epoch 0 under the `before` sources on w1 ranks, resumed under `after` on w2, then
    stopped again and resumed under `before` on w3 (a removed source comes back); packed rows are checked for an
    exact resume, padded ones (a sample a row) for what they serve; the new list may come with new weights.
    (Sources are paired by spec or files in
    common: a source whose data moved, grew or changed is the same source, see test_data_changes.)"""
    assume(before != after)
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_sources(root, files)
        common: dict[str, Any] = {"cached": True, "pack": pack, "dataset_weights": None, "task_weights": None,
                                  "stopping_strategy": exhausted}
        swap_and_come_back(root, names, runtime, common, before=before, after=after, weights=weights,
                           worlds=(w1, w2, w3), stop=stop, again=again, check=check_served,
                           change="epoch 0 from row", fresh_world=w2)


def check_served(served: list[str], resumed: list[str], rows: list[set[str]], before: set[int], after: set[int],
                 exhausted: str) -> None:
    """What the epoch serves after a resume under the `after` sources, given what it served before (`before`: the
    sources served before, `rows`: each source's row hashes)."""
    assert not {row for s in set(range(len(rows))) - after for row in rows[s]} & set(resumed)  # removed: not drawn
    if sum(len(rows[s] - set(served)) for s in after) < VIRTUAL:  # too few left for every virtual rank: it ends
        assert not resumed
        return
    if exhausted == "first_exhausted":  # no source restarted: nothing twice in the epoch
        everything = served + resumed
        assert len(everything) == len(set(everything))
    else:  # every source runs out: the rest of each source, and all of a new one, are served after the resume
        for s in after:
            assert rows[s] - set(served) <= set(resumed)


def test_inside_an_epoch_sources_are_matched_by_content_and_one_that_changed_is_refused(
        tmp_path: Path, runtime: Runtime) -> None:
    """Cached mode: a source whose data moved to another folder is the same source beside one added (it continues,
    nothing twice); a source kept in `names` whose file changed since the epoch began cannot continue: refused."""
    names = write_sources(tmp_path, ((30,), (25,), (20,)))
    common = {"cached": True, "pack": False, "dataset_weights": None, "task_weights": None,
              "stopping_strategy": "first_exhausted"}
    old = make_dataset(tmp_path, names[:2], runtime, **common)
    steps, cursors = global_steps(old, 2)
    served = epoch_rows(steps[:1])
    shutil.copytree(tmp_path / "src0", tmp_path / "moved")
    moved = make_dataset(tmp_path, [f"local:{tmp_path / 'moved'}/*.jsonl", *names[1:]], runtime, **common)
    after = epoch_rows(global_steps(moved, 3, cursors[0])[0])
    assert after and len(served + after) == len(set(served + after))
    assert any("(added: " + names[2] + "; removed: none)" in change for change in moved.mixtures.changes)

    with (tmp_path / "src1" / "part0.jsonl").open("a") as f:
        f.write(json.dumps(record(999)) + "\n")
    changed = make_dataset(tmp_path, names, runtime, **common)
    start = decode_cursor(cursors[0], fingerprint=changed.fingerprint, seq_len=SEQ_LEN)
    with pytest.raises(Refused, match=r"src1/\*.jsonl is in both lists but its files, or its filter, changed"):
        Feed(changed, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=start)


BLOCK = 7  # make_dataset's shuffle block
FEW = (1, 2, 3)  # world sizes (streaming: every rank reads the whole stream)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.lists(st.integers(6, 14), min_size=1, max_size=2).map(tuple), min_size=3, max_size=3)
       .map(tuple), w1=st.sampled_from(FEW), w2=st.sampled_from(FEW), w3=st.sampled_from(FEW),
       before=st.sets(st.integers(0, 2), min_size=1), after=st.sets(st.integers(0, 2), min_size=1),
       stop=st.integers(0, 30), again=st.integers(0, 30), pack=st.booleans(),
       exhausted=st.sampled_from(["first_exhausted", "all_exhausted"]),
       mode=st.sampled_from(["weighted", "round_robin"]),
       weights=st.none() | st.lists(st.sampled_from(WEIGHTS), min_size=3, max_size=3))
def test_sources_added_or_removed_inside_a_streaming_epoch_serve_nothing_twice(
        runtime: Runtime, files: tuple[tuple[int, ...], ...], w1: int, w2: int, w3: int, before: set[int],
        after: set[int], stop: int, again: int, pack: bool, exhausted: str, mode: str,
        weights: list[float] | None) -> None:
    """Streaming mode: stopped inside epoch 0 under the `before` sources on w1 ranks, resumed under `after` on w2
    (the shuffle block in progress is finished under `before`, the next ones drawn from `after`), then resumed
    exactly on w3, and stopped again and resumed under `before` (a removed source comes back); packed rows are
    checked for an exact resume, padded ones (a sample a row) for what they serve."""
    assume(before != after)
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_sources(root, files)
        common: dict[str, Any] = {"cached": False, "pack": pack, "dataset_weights": None, "task_weights": None,
                                  "stopping_strategy": exhausted, "interleave_mode": mode, "epochs": 2}
        swap_and_come_back(root, names, runtime, common, before=before, after=after, weights=weights,
                           worlds=(w1, w2, w3), stop=stop, again=again, check=check_streamed,
                           change="sources now", fresh_world=1)



def check_streamed(served: list[str], resumed: list[str], rows: list[set[str]], before: set[int], after: set[int],
                   exhausted: str) -> None:
    """What a streaming epoch serves after a resume under the `after` sources (`before`: the sources served before,
    `rows`: each source's row hashes): the rest of the shuffle block in progress, then only the `after` sources."""
    removed = {row for s in set(range(len(rows))) - after for row in rows[s]}
    assert not removed & set(resumed[BLOCK:])  # past the block in progress, a removed source is not drawn
    if exhausted == "first_exhausted":  # no source restarted: nothing twice in the epoch
        everything = served + resumed
        assert len(everything) == len(set(everything))
    else:  # every source runs out: the rest of each source, and all of a new one, are served after the resume
        for s in after:
            assert rows[s] - set(served) <= set(resumed)


def test_inside_a_streaming_epoch_what_cannot_continue_is_refused(tmp_path: Path, runtime: Runtime) -> None:
    """Streaming mode: a source list changed inside an epoch with sequential mixing, or with a source's files
    changed since the epoch began, is refused, saying why."""
    names = write_sources(tmp_path, ((20,), (20,), (20,)))
    common = {"cached": False, "pack": False, "dataset_weights": None, "task_weights": None}
    for mode, change in (("sequential", "with interleave_mode: sequential"), ("weighted", "hold other files")):
        old = make_dataset(tmp_path, names[:2], runtime, **common, interleave_mode=mode)
        cursor = global_steps(old, 1)[1][0]
        if mode == "weighted":
            with (tmp_path / "src1" / "part0.jsonl").open("a") as f:
                f.write(json.dumps(record(999)) + "\n")
        new = make_dataset(tmp_path, [names[0], names[2]], runtime, **common, interleave_mode=mode)
        start = decode_cursor(cursor, fingerprint=new.fingerprint, seq_len=SEQ_LEN)
        with pytest.raises(Refused, match=f"taken inside epoch 0, served with another list of sources.*{change}"):
            Feed(new, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=start)


def test_a_union_of_more_sources_than_a_cursor_can_name_is_refused(tmp_path: Path, runtime: Runtime,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The new list's positions in the union ("0,2") must fit a cursor's mixture; a union too big for it (about 300
    sources at 1,024 characters, here the limit is cut to 2) is refused when it resumes, not at its next cursor."""
    names = write_sources(tmp_path, ((20,), (20,), (20,)))
    common: dict[str, Any] = {"cached": False, "pack": False, "dataset_weights": None, "task_weights": None}
    cursor = global_steps(make_dataset(tmp_path, names[:2], runtime, **common), 1)[1][0]
    new = make_dataset(tmp_path, [names[0], names[2]], runtime, **common)
    monkeypatch.setattr(stream_sources, "MEMBERS_CHARS", 2)
    start = decode_cursor(cursor, fingerprint=new.fingerprint, seq_len=SEQ_LEN)
    with pytest.raises(Refused, match=r"the union of the two lists \(3 sources\) is more than a cursor can name"):
        Feed(new, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=start)
    monkeypatch.undo()
    assert Feed(new, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=start).union is not None
