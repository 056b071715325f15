"""Streaming mode's global rows: one row sequence per epoch whatever the layout, dealt per `Deal`, exactly once
under `keep`, even across ranks under `pad`/`drop`, and resumable from any rank's state on any other layout."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil_feed.server.config import parse_config
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.rows.batch import Rows
from sigil_feed.server.rows.deal import Deal
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.streaming.packer import Packer, StreamState
from tests.conftest import TOKENIZER_DIR, rust_pair, write_jsonl
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)

SEQ = 16
GLOBAL_BATCH = 12
LAYOUTS = [(1, 12), (2, 6), (3, 4), (4, 3)]  # (world size, batch size), the same global batch
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Row = tuple[Any, ...]


def records(n: int, tag: int) -> list[dict[str, Any]]:
    """Pairs of two task types, every fifth one too short for the length filter."""
    out = []
    for i in range(n):
        pair = rust_pair(100 * tag + i, task="rare" if i % 3 == 0 else "completion")
        out.append({**pair, "gen": "x"} if i % 5 == 4 else pair)
    for record in out[4::5]:
        record["prompt"] = "short"
    return out


def make_dataset(root: Path, runtime: Runtime, n: int, *, pack: bool, remainder: str, completion_only: bool = False,
                 block: int = 5) -> ServedDataset:
    """Two sources mixed by weight, task weights and the length filter on, small shuffle blocks."""
    sources = [write_jsonl(root / f"s{k}.jsonl", records(n + k, k)) for k in range(2)]
    raw = {"model_name": str(TOKENIZER_DIR), "max_seq_len": SEQ, "pack": pack,
           "dataset": {"names": [f"local:{s}" for s in sources], "use_cache": False, "shuffle_seed": 7,
                       "shuffle_block": block, "remainder": remainder, "interleave_mode": "weighted",
                       "stopping_strategy": "all_exhausted", "dataset_weights": {f"local:{sources[1]}": 2.0},
                       "task_weights": {"rare": 2.5}, "min_length": 40, "completion_only": completion_only}}
    return ServedDataset(parse_config(raw, "test.yaml", root).datasets["default"], "test.yaml", encoder(),
                         runtime=runtime)


def rows_of(batch: Rows) -> list[Row]:
    """Each row of a batch as a hashable value: ids, segment lengths (packed) or length, and mask."""
    if batch.row_segments is not None:
        segments = np.split(batch.lengths, np.cumsum(batch.row_segments)[:-1])
    else:
        segments = [batch.lengths[i:i + 1] for i in range(len(batch.lengths))]
    masks = batch.loss_mask if batch.loss_mask is not None else [None] * len(segments)
    return [(hashlib.sha256(ids.tobytes()).hexdigest(), tuple(seg.tolist()), None if m is None else m.tobytes())
            for ids, seg, m in zip(batch.input_ids, segments, masks, strict=True)]


def run(dataset: ServedDataset, world: int, batch: int, *, state: StreamState | None = None,
        steps: int | None = None) -> tuple[dict[int, Row], list[int], list[Packer]]:
    """Every rank of the layout from `state` (or the epoch's start), `steps` steps or to the end: the rows
    delivered by global row, the batches per rank, and the packers."""
    delivered: dict[int, Row] = {}
    packers = []
    for rank in range(world):
        packer = dataset.packer(epoch=0, rank=rank, world_size=world, batch_size=batch, seq_len=SEQ)
        assert isinstance(packer, Packer)
        if state is not None:
            packer.set_state(state)
        packers.append(packer)
    counts = [0] * world
    running = list(range(world))
    while running:  # the ranks in turn, a batch each, as a run's ranks ask (they share each block's read)
        for rank in list(running):
            packer = packers[rank]
            start = packer.row
            got = None if steps is not None and counts[rank] >= steps else packer.next_batch()
            if got is None:
                running.remove(rank)
                continue
            for index, row in zip(Deal(rank, world, batch).rows(start).tolist(), rows_of(got), strict=False):
                assert index not in delivered
                delivered[index] = row
            counts[rank] += 1
    return delivered, counts, packers


def oracle(dataset: ServedDataset) -> tuple[dict[int, Row], int]:
    """The epoch's global rows by index, read by one rank in one window far larger than the epoch (`pad`: rows
    past the end wrap to its start), and the number of rows `Deal` counts as the epoch's."""
    remainder = dataset.section.remainder
    packer = dataset.packer(epoch=0, rank=0, world_size=1, batch_size=400, seq_len=SEQ)
    assert isinstance(packer, Packer)
    packer.remainder = "pad" if remainder == "pad" else "keep"
    got = packer.next_batch()
    assert packer.end is not None and packer.end < 400 * packer.unit
    packer.remainder = remainder
    return dict(enumerate(rows_of(got))) if got is not None else {}, packer._total()


def expected_indices(start: int, total: int, world: int, batch: int, remainder: str) -> set[int]:
    """The global rows a layout delivers from window `start` to the epoch's end, per Deal."""
    out: set[int] = set()
    while True:
        window = [Deal(r, world, batch).batch(start, total, remainder).tolist() for r in range(world)]
        if not any(window):
            return out
        out.update(i for rows in window for i in rows)
        start += world * batch


@SETTINGS
@given(n=st.integers(0, 30), pack=st.booleans(), remainder=st.sampled_from(["keep", "pad", "drop"]))
def test_every_layout_delivers_the_same_global_rows(runtime: Runtime, n: int, pack: bool, remainder: str) -> None:
    with TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp), runtime, n, pack=pack, remainder=remainder, completion_only=n % 2 == 1)
        rows, total = oracle(dataset)
        for world, batch in LAYOUTS:
            delivered, counts, _ = run(dataset, world, batch)
            assert set(delivered) == expected_indices(0, total, world, batch, remainder)
            assert all(delivered[i] == rows[i] for i in delivered)
            if remainder != "keep":
                assert len(set(counts)) == 1  # pad and drop: every rank the same number of batches


@SETTINGS
@given(n=st.integers(1, 30), pack=st.booleans(), remainder=st.sampled_from(["keep", "pad", "drop"]),
       first=st.sampled_from(LAYOUTS), then=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       stop=st.integers(0, 6), donor=st.integers(0, 3))
def test_any_ranks_state_resumes_any_layout_exactly(runtime: Runtime, n: int, pack: bool, remainder: str,
                                                    first: tuple[int, int], then: tuple[int, int], stop: int,
                                                    donor: int) -> None:
    """Stop layout `first` after `stop` steps, resume layout `then` (another world and batch size) from one
    rank's state: the rows before and after are the rows of the uninterrupted epoch, none twice."""
    with TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp), runtime, n, pack=pack, remainder=remainder, block=4)
        rows, total = oracle(dataset)
        before, _, packers = run(dataset, *first, steps=stop)
        states = [p.get_state() for p in packers]
        assert all(s == states[0] for s in states)  # every rank stands at the same position
        after, _, _ = run(dataset, *then, state=states[donor % len(states)])
        position = states[0].row
        assert all(i < position for i in before) and all(i >= position for i in after)
        assert set(after) == expected_indices(position, total, *then, remainder)
        assert all(after[i] == rows[i] for i in after) and all(before[i] == rows[i] for i in before)


def test_keep_delivers_every_sample_of_the_epoch_exactly_once(tmp_path: Path, runtime: Runtime) -> None:
    """The real tokens of the global rows, in order, are the epoch's samples (mixed, task-weighted, filtered),
    each once: split at EOS they are the multiset of the mix's samples, encoded."""
    dataset = make_dataset(tmp_path, runtime, 40, pack=True, remainder="keep")
    samples = list(dataset.mix())
    encoded = encoder().encode(samples, False)
    expected = Counter(tuple(e.ids.tolist()) for e in encoded.samples())
    for world, batch in LAYOUTS[1:]:
        tokens: dict[int, list[int]] = {}
        for rank in range(world):
            packer = dataset.packer(epoch=0, rank=rank, world_size=world, batch_size=batch, seq_len=SEQ)
            while True:
                start = packer.row
                got = packer.next_batch()
                if got is None:
                    break
                real = got.lengths.reshape(-1) if got.row_segments is None else np.add.reduceat(
                    got.lengths, np.concatenate([[0], np.cumsum(got.row_segments)[:-1]]))
                for index, ids, n in zip(Deal(rank, world, batch).rows(start).tolist(), got.input_ids,
                                         real.tolist(), strict=False):
                    tokens[index] = ids[:n].tolist()
        stream = np.array([t for i in sorted(tokens) for t in tokens[i]])
        assert sorted(tokens) == list(range(len(tokens)))
        pieces = np.split(stream, np.flatnonzero(stream == encoder().eos_id) + 1)
        assert Counter(tuple(p.tolist()) for p in pieces if len(p)) == expected
        assert len(samples) > 40 and sum(s.source == 1 for s in samples) > sum(s.source == 0 for s in samples)


def test_only_owned_rows_are_copied_and_segments_add_up(tmp_path: Path, runtime: Runtime) -> None:
    """A rank's packed rows are whole rows of seq_len (the last may be partial) whose segments sum to their
    real tokens; the window's rows of other ranks are passed, not returned."""
    dataset = make_dataset(tmp_path, runtime, 30, pack=True, remainder="keep")
    packer = dataset.packer(epoch=0, rank=1, world_size=3, batch_size=2, seq_len=SEQ)
    got = packer.next_batch()
    assert got is not None and got.input_ids.shape == (2, SEQ) and packer.row == 6
    assert got.row_segments is not None and got.lengths.sum() == got.tokens == 2 * SEQ
    assert packer.get_state().at.block >= 0 and packer.get_state().wraps == 0
