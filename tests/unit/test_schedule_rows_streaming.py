"""Mixture schedules with phases from a global row inside an epoch, in streaming mode.

The stated rule (streaming/block_mixtures.py): shuffle block k starts at unit U_k of the epoch's stream (packed:
the tokens of blocks 0..k-1; padded: their samples) and is drawn under the mixture the schedule has in force at
global row U_k // unit (unit: seq_len packed, 1 padded). The tests rebuild each epoch from that rule alone, with the
mix, the block permutation and the tokenizer, and compare every served row with it; an uninterrupted run equals one
stopped after any step and resumed on another world size, step for step; a run resumed under another schedule keeps
the blocks it served and follows the new schedule by the same rule from the next block none of which is served."""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice, pairwise
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil_feed.server.feed.batches import Feed
from sigil_feed.server.feed.cursor import decode_cursor
from sigil_feed.server.feed.mixtures import Mixture
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.streaming.packer import StreamState
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)
from tests.unit.test_elastic import SEQ_LEN, STEP_ROWS, global_steps
from tests.unit.test_mixture_schedules import EPOCHS, make_dataset, write_sources
from tests.unit.test_schedule_rows import PHASE_RUNS, draw_schedules, phase_list

Rule = Callable[[int, int], Mixture]
"""(block, the global row it starts in) -> the mixture it is drawn under."""


def served_rows(dataset: ServedDataset, cursor: bytes = b"") -> dict[int, list[list[int]]]:
    """Every epoch's rows (their real tokens) as one rank of one serves them from `cursor`."""
    start = decode_cursor(cursor, fingerprint=dataset.fingerprint, seq_len=SEQ_LEN) if cursor else None
    epochs: dict[int, list[list[int]]] = {}
    for item in Feed(dataset, rank=0, world_size=1, batch_size=STEP_ROWS, seq_len=SEQ_LEN, start=start):
        rows = item.rows
        if rows is None:
            continue
        if rows.row_segments is None:
            real = rows.lengths.tolist()
        else:
            real = [int(part.sum()) for part in np.split(rows.lengths, np.cumsum(rows.row_segments)[:-1])]
        epochs.setdefault(item.epoch, []).extend(ids[:n].tolist() for ids, n in zip(rows.input_ids, real,
                                                                                    strict=True))
    return epochs


def expected_rows(dataset: ServedDataset, epoch: int, rule: Rule) -> list[list[int]]:
    """The epoch's rows by the stated rule: block after block of the mix, each drawn under `rule`'s mixture for the
    row it starts in, permuted by (seed, epoch, block), encoded, and cut into rows."""
    section, pack = dataset.section, dataset.config.pack
    mix = dataset.mix(None, rule(0, 0))
    samples: list[list[int]] = []
    units = 0
    for block in range(1 << 20):
        mixture = rule(block, units // (SEQ_LEN if pack else 1))
        mix.reweight(mixture.weights, mixture.task_weights)
        drawn = list(islice(mix, section.shuffle_block))
        assert section.shuffle_seed is not None
        order = np.random.default_rng([section.shuffle_seed, epoch, block]).permutation(len(drawn))
        if drawn:
            encoded = dataset.encoder.encode([drawn[i] for i in order], section.completion_only)
            samples += [encoded.ids[a:b].tolist() for a, b in pairwise(encoded.offsets.tolist())]
        units = sum(map(len, samples)) if pack else len(samples)
        if len(drawn) < section.shuffle_block:
            break
    if not pack:
        return [ids[:SEQ_LEN] for ids in samples]
    stream = [token for ids in samples for token in ids]
    return [stream[i:i + SEQ_LEN] for i in range(0, len(stream), SEQ_LEN)]


def by_schedule(dataset: ServedDataset, epoch: int) -> Rule:
    """The stated rule under the dataset's schedules."""
    return lambda block, row: dataset.mixtures.at(epoch, row)


def blocks_then(first: Rule, later: Rule, at: int) -> Rule:
    """`first`'s mixture for the blocks before `at`, `later`'s from `at` on (a resume under another schedule)."""
    return lambda block, row: first(block, row) if block < at else later(block, row)


def next_unserved_block(dataset: ServedDataset, cursor: bytes) -> int:
    """The first block a cursor's position has served none of."""
    state = decode_cursor(cursor, fingerprint=dataset.fingerprint, seq_len=SEQ_LEN).state
    assert isinstance(state, StreamState) and not state.wraps
    return state.at.block + (1 if state.at.taken or state.offset else 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**PHASE_RUNS)
def test_each_block_follows_the_phase_in_force_at_its_first_row_for_every_world_size_and_resume(
        runtime: Runtime, files: tuple[tuple[int, ...], ...], pack: bool, drawn: st.DataObject, w1: int, w2: int,
        stop: int, remainder: str, stopping: str) -> None:
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = write_sources(root, files)
        weights, first, later, tasks = draw_schedules(drawn, names, explain_later=2.0)
        common: dict[str, Any] = {"cached": False, "pack": pack, "remainder": remainder, "stopping_strategy": stopping}
        dataset = make_dataset(root, names, runtime, dataset_weights=phase_list(names, first, later),
                               task_weights=tasks, **common)
        if remainder == "keep":  # every row of every epoch is the stated rule's
            served = served_rows(dataset)
            for e in range(EPOCHS):
                assert served.get(e, []) == expected_rows(dataset, e, by_schedule(dataset, e))
        full, cursors = global_steps(dataset, w1)
        if not full:  # `drop` and an epoch of less than one window: nothing to serve
            return

        # every world size serves the same rows; stopped after any step and resumed on another, the same again
        assert global_steps(dataset, w2)[0] == full
        stop %= len(full)
        resumed, again = global_steps(dataset, w2, cursors[stop])
        assert resumed == full[stop + 1:]
        if resumed:
            half = len(again) // 2
            assert global_steps(dataset, w1, again[half])[0] == resumed[half + 1:]

        # resumed under another schedule by row: the blocks served before the cursor keep their mixtures, the rest
        # of the epoch follows the new schedule by the same rule; resumed again on w1 it continues exactly
        moved = drawn.draw(st.lists(st.tuples(st.integers(0, EPOCHS - 1), st.integers(1, 70), weights),
                                    max_size=3))
        changed = make_dataset(root, names, runtime, dataset_weights=phase_list(names, first, moved),
                               task_weights=tasks, **common)
        resumed, again = global_steps(changed, w2, cursors[stop])
        new_run = global_steps(changed, w2)[0]
        epoch, row = full[stop][0], full[stop][1] + STEP_ROWS
        assert [s for s in resumed if s[0] > epoch] == [s for s in new_run if s[0] > epoch]
        if resumed:
            half = len(again) // 2
            assert global_steps(changed, w1, again[half])[0] == resumed[half + 1:]
        if remainder == "keep" and stop + 1 < len(full) and full[stop + 1][0] == epoch:  # a cursor inside the epoch
            at = next_unserved_block(dataset, cursors[stop])
            rule = blocks_then(by_schedule(dataset, epoch), by_schedule(changed, epoch), at)
            assert served_rows(changed, cursors[stop]).get(epoch, []) == expected_rows(changed, epoch, rule)[row:]


def test_a_phase_from_a_row_takes_effect_from_the_first_block_at_or_after_it(tmp_path: Path,
                                                                            runtime: Runtime) -> None:
    """Padded rows (a row is a sample) and blocks of 7 samples: a phase from row 17 that weighs source 0 down to
    almost nothing applies from block 3 (rows 21 on); rows 0-20 are the even mixture's, as a constant config serves
    them; GetStats-facing `rows_inside` shows row 17, and a cursor after row 24 carries blocks 0-2 under the even
    mixture and block 3 under the phase's."""
    names = write_sources(tmp_path, ((40,), (40,)))
    common: dict[str, Any] = {"cached": False, "pack": False, "task_weights": None,
                              "stopping_strategy": "first_exhausted"}
    skewed = {names[0]: 0.001, names[1]: 3.0}
    even = make_dataset(tmp_path, names, runtime, dataset_weights=None, **common)
    only1 = make_dataset(tmp_path, names[1:], runtime, dataset_weights=None, **common)
    phased = make_dataset(tmp_path, names, runtime, **common, dataset_weights=[
        {"from_epoch": 0, "weights": {}}, {"from_epoch": 0, "from_row": 17, "weights": skewed}])
    assert phased.mixtures.rows_inside(0) == [17]
    rows, before = served_rows(phased)[0], served_rows(even)[0]
    assert rows[:21] == before[:21] and rows[21:24] != before[21:24]
    source1 = {tuple(r) for r in served_rows(only1)[0]}
    assert sum(tuple(r) not in source1 for r in rows[21:40]) <= 1  # source 0 (almost) never drawn again
    cursor = global_steps(phased, 2)[1][1]  # after rows 0-23: block 3 begun
    mix = decode_cursor(cursor, fingerprint=phased.fingerprint, seq_len=SEQ_LEN).mixture
    assert mix is not None
    assert [(m.at, m.r, m.w) for m in mix] == [(0, None, [1.0, 1.0]), (3, None, [0.001, 3.0]),
                                                (0, True, [1.0, 1.0]), (17, True, [0.001, 3.0])]

