"""Elastic resume, end to end through Feed: a run stopped after any step on w1 ranks and resumed from one rank's
cursor on w2 ranks delivers exactly the global batches the uninterrupted run delivers after that step, in both
modes, with packing, remainder rules, mixing, task weights and virtual ranks all varied."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil_feed.server.config import parse_config
from sigil_feed.server.feed.batches import Feed
from sigil_feed.server.feed.cursor import decode_cursor
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.rows.deal import Deal
from sigil_feed.server.runtime import Runtime
from tests.conftest import TOKENIZER_DIR, rust_pair, write_jsonl
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)

STEP_ROWS = 12
"""Rows per global batch in every run: world sizes 1, 2, 3, 4, 6 and 12 each take STEP_ROWS / w per batch."""
WORLDS = (1, 2, 3, 4, 6, 12)
SEQ_LEN = 32


def record(i: int) -> dict[str, Any]:
    """A pair of varied length (so rows cut samples at many offsets) and one of two task types."""
    pair = rust_pair(i, task="completion" if i % 3 else "explain")
    return {**pair, "gen": pair["gen"] + "    // step\n" * (i % 5)}


@dataclass(frozen=True)
class Corpus:
    """Sources as lists of file sizes (records per file), and the serve-time settings of the run."""

    files: tuple[tuple[int, ...], ...]
    cached: bool
    pack: bool
    remainder: str
    virtual: int
    mode: str
    stopping: str
    task_weight: float | None


def make_dataset(root: Path, corpus: Corpus, runtime: Runtime) -> ServedDataset:
    names, first = [], 0
    for s, sizes in enumerate(corpus.files):
        for f, size in enumerate(sizes):
            write_jsonl(root / f"src{s}" / f"part{f}.jsonl", [record(first + i) for i in range(size)])
            first += size
        names.append(f"local:{root / f'src{s}'}/*.jsonl")
    section: dict[str, Any] = {
        "names": names, "use_cache": corpus.cached, "cache_dir": str(root / "cache"), "shuffle_seed": 5,
        "shuffle_block": 7, "remainder": corpus.remainder, "epochs": 2, "interleave_mode": corpus.mode,
        "stopping_strategy": corpus.stopping, "virtual_ranks": corpus.virtual, "shuffle_window_shards": 2}
    if corpus.mode == "weighted":
        section["dataset_weights"] = {names[0]: 2.0}
    if corpus.task_weight is not None:
        section["task_weights"] = {"explain": corpus.task_weight}
    raw = {"model_name": str(TOKENIZER_DIR), "max_seq_len": SEQ_LEN, "pack": corpus.pack, "dataset": section}
    dataset = ServedDataset(parse_config(raw, "test.yaml", root).datasets["default"], "test.yaml", encoder(),
                            runtime=runtime)
    dataset.prepare(show_bar=False)
    return dataset


def row_hashes(rows: Any) -> list[str]:
    """One hash per row of a batch: its token ids and its segment (or real-token) lengths."""
    if rows.row_segments is None:
        lengths = [[int(n)] for n in rows.lengths]
    else:
        lengths = [part.tolist() for part in np.split(rows.lengths, np.cumsum(rows.row_segments)[:-1])]
    return [hashlib.blake2b(ids.tobytes() + repr(n).encode(), digest_size=8).hexdigest()
            for ids, n in zip(rows.input_ids, lengths, strict=True)]


Step = tuple[int, int, tuple[str, ...]]
"""(epoch, global row where the step starts, the global batch's rows in global row order)."""


def global_steps(dataset: ServedDataset, world: int, cursor: bytes = b"") -> tuple[list[Step], list[bytes]]:
    """Every step of `world` ranks (batch STEP_ROWS / world each) from `cursor`, and rank 0's cursor after each."""
    batch = STEP_ROWS // world
    start = decode_cursor(cursor, fingerprint=dataset.fingerprint, seq_len=SEQ_LEN) if cursor else None
    windows: dict[tuple[int, int], dict[int, str]] = {}
    cursors: dict[tuple[int, int], bytes] = {}
    feeds = {rank: Feed(dataset, rank=rank, world_size=world, batch_size=batch, seq_len=SEQ_LEN, start=start)
             for rank in range(world)}
    while feeds:  # the ranks in turn, a batch each, as a run's ranks ask (streaming: they share each block's read)
        for rank, feed in list(feeds.items()):
            item = next(feed, None)
            if item is None:
                del feeds[rank]
                continue
            if item.rows is None:
                continue
            first = item.row - STEP_ROWS  # the position after the batch is the end of its window
            rows = windows.setdefault((item.epoch, first), {})
            virtual = dataset.layouts[item.epoch].virtual if dataset.layouts is not None else 1
            for row, digest in zip(Deal(rank, world, batch, virtual).rows(first).tolist(), row_hashes(item.rows),
                                   strict=False):  # the packer's deal (keep's ragged batch: a prefix of it)
                assert row not in rows
                rows[row] = digest
            if rank == 0:
                cursors[(item.epoch, first)] = item.cursor
    keys = sorted(windows)
    return [(e, s, tuple(windows[(e, s)][j] for j in sorted(windows[(e, s)]))) for e, s in keys], \
        [cursors[k] for k in keys]


corpora = st.builds(
    Corpus,
    files=st.lists(st.lists(st.integers(2, 30), min_size=1, max_size=3).map(tuple), min_size=1, max_size=2)
    .map(tuple),
    cached=st.booleans(), pack=st.booleans(), remainder=st.sampled_from(["keep", "pad", "drop"]),
    virtual=st.sampled_from([1, 2, 4, 6, 12]), mode=st.sampled_from(["sequential", "round_robin", "weighted"]),
    stopping=st.sampled_from(["first_exhausted", "all_exhausted"]),
    task_weight=st.sampled_from([None, 0.5, 2.0]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus=corpora, w1=st.sampled_from(WORLDS), w2=st.sampled_from(WORLDS), stop=st.integers(0, 40))
def test_a_run_resumed_on_another_world_size_continues_the_uninterrupted_run_step_for_step(
        runtime: Runtime, corpus: Corpus, w1: int, w2: int, stop: int) -> None:
    with TemporaryDirectory() as tmp:
        try:
            dataset = make_dataset(Path(tmp), corpus, runtime)
        except ValueError as err:  # more virtual ranks than samples: refused, as the README says
            assert "virtual_ranks" in str(err)
            return
        full, cursors = global_steps(dataset, w1)
        if not full:
            return
        stop %= len(full)
        resumed, _ = global_steps(dataset, w2, cursors[stop])
        assert resumed == full[stop + 1:]
        assert global_steps(dataset, w2)[0] == full  # and an uninterrupted run on w2 ranks is the same run
