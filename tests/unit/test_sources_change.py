"""Sources added to or removed from `names` at an epoch boundary, through Feed, in both modes: a cursor at an epoch's
end (the end-of-epoch item's; in cached mode also the last step's, of any rank and world size) resumes under the
new list, and every later epoch is exactly what a run of the new configuration serves; a cursor inside an epoch
is refused, saying why."""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil_feed.server.errors import Refused
from sigil_feed.server.feed.batches import Feed
from sigil_feed.server.feed.cursor import decode_cursor
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.runtime import Runtime
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)
from tests.unit.test_elastic import SEQ_LEN, STEP_ROWS, WORLDS, global_steps
from tests.unit.test_mixture_schedules import make_dataset, write_sources


def epoch_end_cursor(dataset: ServedDataset, epoch: int) -> bytes:
    """The cursor of the end-of-epoch item of `epoch` (one rank taking whole steps)."""
    feed = Feed(dataset, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=None)
    return next(item.cursor for item in feed if item.rows is None and item.epoch == epoch)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.lists(st.integers(3, 20), min_size=1, max_size=2).map(tuple), min_size=3, max_size=3)
       .map(tuple), cached=st.booleans(), pack=st.booleans(), w1=st.sampled_from(WORLDS),
       w2=st.sampled_from(WORLDS), before=st.sets(st.integers(0, 2), min_size=1),
       after=st.sets(st.integers(0, 2), min_size=1), inside=st.integers(0, 30))
def test_sources_change_at_an_epoch_boundary_and_are_refused_inside_one(
        runtime: Runtime, files: tuple[tuple[int, ...], ...], cached: bool, pack: bool, w1: int, w2: int,
        before: set[int], after: set[int], inside: int) -> None:
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
        if cached:  # the last step's cursor is at the epoch's end too
            assert global_steps(new, w2, cursors[last])[0] == resumed
        elif len(before) != len(after):  # streaming learns of the end only past it
            with pytest.raises(Refused, match="sources change only at an epoch boundary"):
                Feed(new, rank=0, world_size=w2, batch_size=STEP_ROWS // w2, seq_len=SEQ_LEN, start=start)
        inside %= last + 1
        if len(before) != len(after) and inside < last:  # (a source swapped for another of its kind, in its
            # place, is that source with other data: data that moves and changes, see test_data_changes)
            start = decode_cursor(cursors[inside], fingerprint=new.fingerprint, seq_len=SEQ_LEN)
            with pytest.raises(Refused, match="taken inside epoch 0, which began with another list of sources"):
                Feed(new, rank=0, world_size=w2, batch_size=STEP_ROWS // w2, seq_len=SEQ_LEN, start=start)
