"""The stream guarantees, as properties over corpus size, batch size, seq_len, world size and mode.

Ranks are disjoint and together cover the epoch exactly; resuming from any batch's cursor yields the
same remaining sequence as the uninterrupted run; the same config gives the same batches.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigil_feed.server.cached.layout import epoch_layout
from sigil_feed.server.config import parse_config
from sigil_feed.server.feed.batches import Feed, FeedItem
from sigil_feed.server.feed.cursor import decode_cursor
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.rows.deal import Deal
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.streaming import encoding as blocks
from sigil_feed.server.streaming.block_order import BlockShuffle
from sigil_feed.server.streaming.shared_reads import SharedReads
from tests.conftest import TOKENIZER_DIR, rust_pair
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_dataset(root: Path, runtime: Runtime, n: int, *, cached: bool, pack: bool = True, remainder: str = "keep",
                 seq_len: int = 32, block: int = 8) -> ServedDataset:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(rust_pair(i)) + "\n" for i in range(n)))
    raw = {"model_name": str(TOKENIZER_DIR), "max_seq_len": seq_len, "pack": pack,
           "dataset": {"names": [f"local:{data}"], "use_cache": cached, "cache_dir": str(root / "cache"),
                       "shuffle_seed": 11, "shuffle_block": block, "remainder": remainder, "epochs": 2}}
    dataset = ServedDataset(parse_config(raw, "test.yaml", root).datasets["default"], "test.yaml", encoder(),
                            runtime=runtime)
    dataset.prepare(show_bar=False)
    return dataset


def feed(dataset: ServedDataset, rank: int, world: int, batch: int, cursor: bytes = b"") -> Feed:
    seq_len = dataset.config.max_seq_len
    start = decode_cursor(cursor, fingerprint=dataset.fingerprint, seq_len=seq_len) if cursor else None
    return Feed(dataset, rank=rank, world_size=world, batch_size=batch, seq_len=seq_len, start=start)


def epoch_items(f: Feed, epoch: int) -> list[FeedItem]:
    return [item for item in f if item.epoch == epoch and item.rows is not None]


def all_samples(n: int) -> Counter[tuple[int, ...]]:
    enc = encoder()
    texts = [r["prompt"] + "\n\n" + r["gen"] for r in map(rust_pair, range(n))]
    return Counter((*tuple(enc.tokenizer(t, add_special_tokens=False).input_ids), enc.eos_id) for t in texts)


@SETTINGS
@given(n=st.integers(1, 40), batch=st.integers(1, 4), world=st.integers(1, 4), cached=st.booleans(),
       epoch=st.integers(0, 1))
def test_ranks_are_disjoint_and_cover_each_epoch_exactly(runtime: Runtime, n: int, batch: int, world: int,
                                                         cached: bool, epoch: int) -> None:
    with TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp), runtime, n, cached=cached, pack=False, seq_len=64)
        received: Counter[tuple[int, ...]] = Counter()
        for rank in range(world):
            for item in epoch_items(feed(dataset, rank, world, batch), epoch):
                assert item.rows is not None
                for row, length in zip(item.rows.input_ids, item.rows.lengths, strict=True):
                    received[tuple(row[:length])] += 1
        assert received == all_samples(n)


def stream_samples(dataset: ServedDataset, per_rank: list[list[FeedItem]], world: int, batch: int
                   ) -> Counter[tuple[int, ...]]:
    """The samples an epoch delivered, put back together: every row at its global row e, in the order of the
    epoch's one stream (cached: the blocks of rows of virtual ranks v = e mod V in region order, row e // V of
    each; streaming: global row order), concatenated, cut after every EOS."""
    rows: dict[int, np.ndarray] = {}
    region = dataset.layouts[0].region if dataset.layouts is not None else np.zeros(1, dtype=np.int64)
    for rank, items in enumerate(per_rank):
        for item in items:
            assert item.rows is not None
            first = item.row - world * batch
            real = np.add.reduceat(item.rows.lengths, np.cumsum(item.rows.row_segments) - item.rows.row_segments)
            dealt = Deal(rank, world, batch, len(region)).rows(first).tolist()  # the packer's deal
            for e, ids, n in zip(dealt, item.rows.input_ids, real, strict=False):
                assert e not in rows
                rows[e] = ids[:n]
    virtual = len(region)
    order = sorted(rows, key=lambda e: (int(region[e % virtual]), e // virtual))
    return Counter(samples_of_ids([rows[e] for e in order], encoder().eos_id))


def samples_of_ids(rows: list[np.ndarray], eos: int) -> list[tuple[int, ...]]:
    """Token rows concatenated and cut after every EOS."""
    if not rows:
        return []
    ids = np.concatenate(rows)
    return [tuple(p) for p in np.split(ids, np.flatnonzero(ids == eos) + 1) if len(p)]


@SETTINGS
@given(n=st.integers(1, 30), batch=st.integers(1, 3), world=st.integers(1, 3), cached=st.booleans(),
       remainder=st.sampled_from(["keep", "pad", "drop"]))
def test_packed_ranks_cover_the_epoch_under_each_remainder_rule(runtime: Runtime, n: int, batch: int, world: int,
                                                               cached: bool, remainder: str) -> None:
    with TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp), runtime, n, cached=cached, remainder=remainder)
        per_rank = [epoch_items(feed(dataset, rank, world, batch), 0) for rank in range(world)]
        tokens = [sum(i.rows.tokens for i in items if i.rows is not None) for items in per_rank]
        total = sum(len(s) for s in all_samples(n).elements())
        step = world * batch * 32  # one global step's tokens: the most an epoch may repeat or lose
        if remainder == "keep":
            assert stream_samples(dataset, per_rank, world, batch) == all_samples(n)
        elif remainder == "pad":  # full rows (the last one completed from the start), fewer than a step repeated
            assert total <= sum(tokens) < total + step and all(t % (batch * 32) == 0 for t in tokens)
        else:  # the last partial window skipped; a partial last row is a row, sent when its window is whole
            assert total - step < sum(tokens) <= total
        if remainder != "keep":
            assert len({len(items) for items in per_rank}) == 1  # equal step counts on every rank, both modes
            assert all(i.rows is not None and len(i.rows.input_ids) == batch for items in per_rank for i in items)


@SETTINGS
@given(n=st.integers(1, 30), batch=st.integers(1, 3), world=st.integers(1, 3), cached=st.booleans(),
       pack=st.booleans(), remainder=st.sampled_from(["keep", "pad", "drop"]), stop=st.integers(0, 30))
def test_resume_from_any_cursor_equals_the_uninterrupted_run(runtime: Runtime, n: int, batch: int, world: int,
                                                              cached: bool, pack: bool, remainder: str,
                                                              stop: int) -> None:
    with TemporaryDirectory() as tmp:
        dataset = make_dataset(Path(tmp), runtime, n, cached=cached, pack=pack, remainder=remainder)
        rank = world - 1
        full = list(feed(dataset, rank, world, batch))
        stop = min(stop, len(full) - 1)
        if stop < 0:
            return
        resumed = list(feed(dataset, rank, world, batch, full[stop].cursor))
        expected = full[stop + 1:]
        assert [(i.epoch, None if i.rows is None else i.rows.input_ids.tolist()) for i in resumed] == \
               [(i.epoch, None if i.rows is None else i.rows.input_ids.tolist()) for i in expected]
        assert all(len(i.cursor) < 1024 for i in full)


def test_same_config_gives_identical_batches_and_epochs_differ(tmp_path: Path, runtime: Runtime) -> None:
    for cached in (False, True):
        a = make_dataset(tmp_path / f"a{cached}", runtime, 60, cached=cached, block=16)
        b = make_dataset(tmp_path / f"b{cached}", runtime, 60, cached=cached, block=16)
        run_a = [i.rows.input_ids.tolist() for i in feed(a, 1, 2, 2) if i.rows is not None]
        run_b = [i.rows.input_ids.tolist() for i in feed(b, 1, 2, 2) if i.rows is not None]
        assert run_a == run_b
        epochs = [[i.rows.input_ids.tolist() for i in epoch_items(feed(a, 0, 1, 2), e)] for e in (0, 1)]
        assert epochs[0] != epochs[1]


def test_tokenize_chunks_end_at_the_character_bound(tmp_path: Path, runtime: Runtime,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk of long samples holds about TOKENIZE_CHUNK_CHARS of text, however many samples it may hold."""
    dataset = make_dataset(tmp_path, runtime, 30, cached=False)
    longest = max(len(s.text) for s in dataset.mix())
    monkeypatch.setattr(blocks, "TOKENIZE_CHUNK", 1000)
    monkeypatch.setattr(blocks, "TOKENIZE_CHUNK_CHARS", 2 * longest)
    chunks: list[int] = []
    order = BlockShuffle(dataset.mix(), block_size=64, block_chars=1 << 20, seed=None, epoch=0)
    block = blocks.encode_block(next(order), encoder(), with_prompts=False,
                                on_encoded=lambda chunk, _: chunks.append(sum(len(s.text) for s in chunk)),
                                pool=runtime.encode_pool)
    assert sum(len(c.result()) for c in block.chunks) == block.samples == 30
    assert len(chunks) > 1 and all(size < 3 * longest for size in chunks)


def epoch_rows(f: Feed) -> Iterator[list[list[int]]]:
    """The batches of the feed's current epoch, up to and including its end marker."""
    for item in f:
        if item.rows is None:
            return
        yield item.rows.input_ids.tolist()


def test_a_rank_left_behind_reads_alone_and_gets_the_same_batches(tmp_path: Path, runtime: Runtime) -> None:
    """Two ranks read a whole epoch while the third waits after one batch: its blocks leave the shared cache
    (bounded here to two blocks' worth), so it reads them itself, and its batches are the ones it gets alone."""
    alone = list(epoch_rows(feed(make_dataset(tmp_path / "alone", runtime, 60, cached=False, block=3), 2, 3, 2)))
    dataset = make_dataset(tmp_path / "shared", runtime, 60, cached=False, block=3)
    dataset.shared_reads = SharedReads(blocks=2)
    feeds = [feed(dataset, rank, 3, 2) for rank in range(3)]
    behind = epoch_rows(feeds[2])
    first = next(behind)
    for _ in zip_longest(epoch_rows(feeds[0]), epoch_rows(feeds[1])):  # the two others, in step
        pass
    counts = dataset.shared_reads.counts
    read_by_the_others = counts.blocks_read
    assert read_by_the_others < 2 * 21 and counts.blocks_shared > 0  # 21 blocks (the last one empty), mostly shared
    assert [first, *behind] == alone
    assert counts.blocks_read > read_by_the_others  # it read its evicted blocks again


def test_the_next_epochs_layout_is_computed_while_this_one_is_served(tmp_path: Path, runtime: Runtime) -> None:
    """Cached mode: the first batch of epoch 0 starts epoch 1's layout in the background (the config has 2 epochs,
    so nothing past it), and it is the layout epoch 1 would compute itself."""
    dataset = make_dataset(tmp_path, runtime, 40, cached=True)
    assert next(feed(dataset, 0, 1, 2)).rows is not None
    assert dataset.layouts is not None and dataset.store is not None
    mixture = dataset.mixtures.at(1)
    assert sorted(dataset.layouts.jobs) == [(0, mixture), (1, mixture)]
    alone = epoch_layout(dataset.store, dataset.layouts.sequences(mixture, None), virtual=dataset.virtual, seed=11,
                         epoch=1, window_shards=dataset.section.shuffle_window_shards, pack=dataset.config.pack)
    assert dataset.layouts.jobs[1, mixture].result().items.tolist() == alone.items.tolist()
