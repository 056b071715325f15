"""Cached mode's epoch layout (virtual ranks, shard-aware regions) and the CachedPacker's global rows."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil_feed.server.cached.layout import (
    AUTO_VIRTUAL,
    ITEMS_PER_VIRTUAL,
    digit_reversal,
    prime_factors,
    virtual_ranks,
)

from .cached_store import digest, fake_store, layout_of, packer, reference, run

RNG = np.random.default_rng(0)
LENGTHS = RNG.integers(1, 40, size=300).tolist()


def test_layout_is_the_served_sequence_permuted() -> None:
    store = fake_store(LENGTHS, per_shard=10)
    served = np.concatenate([np.arange(300), np.arange(0, 300, 3)])  # task copies repeat items
    for seed in (None, 3):
        layout = layout_of(store, 12, seed=seed, sequence=served)
        assert sorted(layout.items.tolist()) == sorted(served.tolist())
        assert layout.cum[-1] == store.lengths[served].sum()
    assert layout_of(store, 12, seed=None, sequence=served).items.tolist() == served.tolist()  # unseeded: no shuffle


def test_epochs_differ_and_shuffle_stays_inside_windows_of_shards() -> None:
    store = fake_store(LENGTHS, per_shard=10)
    a, b = layout_of(store, 6, epoch=0, window=2), layout_of(store, 6, epoch=1, window=2)
    assert a.items.tolist() != b.items.tolist()
    for q in range(6):
        shards = store.shard[a.items[a.bounds[q]:a.bounds[q + 1]]]
        for shard in np.unique(shards):  # a shard's items spread over its window of 2 shards, no wider
            where = np.flatnonzero(shards == shard)
            assert len(np.unique(shards[where[0]:where[-1] + 1])) <= 2
        assert len(np.unique(shards[:len(shards) // 2])) >= 2  # and they do mix


def test_regions_are_non_empty_and_balanced_by_tokens_when_packed_by_items_when_padded() -> None:
    store = fake_store(LENGTHS, per_shard=10)
    for virtual in (1, 5, 12, 48, 300):
        layout = layout_of(store, virtual)
        counts, tokens = layout.counts(), layout.tokens()
        assert (counts >= 1).all() and counts.sum() == 300
        if virtual <= 12:
            assert np.abs(tokens - tokens.sum() / virtual).max() <= max(LENGTHS)
        padded = layout_of(store, virtual, pack=False).counts()  # exactly the blocks of rows its ranks read
        assert padded.tolist() == (300 // virtual + (np.arange(virtual) < 300 % virtual)).tolist()


def test_more_virtual_ranks_than_items_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"virtual_ranks is 301.*only 300 items"):
        virtual_ranks(301, 300)
    assert virtual_ranks(300, 300) == 300
    assert virtual_ranks("auto", 300) == 4 and virtual_ranks("auto", 10) == 1
    assert virtual_ranks("auto", 64 * 3072) == 3072 and virtual_ranks("auto", 64 * 3072 - 1) == 1536


def test_auto_virtual_ranks_serve_real_job_shapes() -> None:
    """8 ranks per node x 2^k nodes up to 1024 ranks, and 6, 12, 24, 48, 96, divide `auto`'s choice once the
    dataset has 64 x 3072 samples (up to 512 from 64 x 1536); the largest adds 3, 5, 6, 7, 9, 10, 12, ...
    nodes; each candidate divides the next, so a world size that divides V keeps dividing it as data grows."""
    assert all(b % a == 0 for a, b in pairwise(AUTO_VIRTUAL))
    for items, worlds in ((64 * 1536, [2 ** k for k in range(10)] + [6, 12, 24, 48, 96]),
                          (64 * 3072, [8 * 2 ** k for k in range(8)] + [6, 12, 24, 48, 96]),
                          (10 ** 9, [8 * n for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15, 16, 32, 64, 128)])):
        chosen = virtual_ranks("auto", items)
        assert chosen * ITEMS_PER_VIRTUAL <= items and [w for w in worlds if chosen % w] == []
    big = digit_reversal(AUTO_VIRTUAL[-1])
    for world in (8, 64, 1024):  # powers of two are prefix products of V's ascending factors: contiguous
        assert (np.diff(np.sort(big.reshape(-1, world).T, axis=1), axis=1) == 1).all()
    assert not (np.diff(np.sort(big.reshape(-1, 48).T, axis=1), axis=1) == 1).all()  # 48: 1/48, scattered


def test_rho_is_a_permutation_and_prefix_products_read_contiguous_regions() -> None:
    rho = digit_reversal(720)
    assert sorted(rho.tolist()) == list(range(720)) and prime_factors(720) == [2, 2, 2, 2, 3, 3, 5]
    for world in (2, 4, 8, 16, 48, 144, 720):
        for r in range(world):
            regions = np.sort(rho[r::world])
            assert (np.diff(regions) == 1).all()
    for world in (3, 5, 6, 10, 12, 360):  # other divisors: still 1/w of the regions, not contiguous
        assert sorted(np.concatenate([rho[r::world] for r in range(world)]).tolist()) == list(range(720))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("remainder", ["pad", "drop", "keep"])
def test_global_rows_are_the_same_for_every_world_size(pack: bool, remainder: str) -> None:
    store = fake_store(LENGTHS, per_shard=10, prompts=[n // 3 for n in LENGTHS],
                       later=[[n // 2, n // 2 + 2] if n // 2 + 2 < n else [] for n in LENGTHS])  # a chat's turns
    layout = layout_of(store, 12, pack=pack)
    expected, total = reference(store, layout, 16, pack, remainder, completion=True, past=12)
    digests = set()
    for world in (1, 2, 3, 4, 6, 12):
        rows, _ = run(store, layout, world, 12 // world, 16, pack, remainder, completion=True)
        digests.add(digest(rows))
        # the rule on the one sequence: fewer than a step's rows (12) repeated or skipped
        delivered = {"pad": -(-total // 12) * 12, "drop": total // 12 * 12, "keep": total}[remainder]
        assert sorted(rows) == list(range(delivered)) and all(rows[g] == expected[g] for g in rows)
    assert len(digests) == 1


def test_every_sample_once_under_keep_at_least_once_under_pad_at_most_once_under_drop() -> None:
    store = fake_store(LENGTHS, per_shard=10)
    layout = layout_of(store, 12)
    everything = sorted(np.concatenate(store.ids).tolist())
    seen = {}
    for remainder in ("keep", "pad", "drop"):
        rows, _ = run(store, layout, 4, 5, 16, True, remainder)
        seen[remainder] = sorted(t for row in rows.values() for segment in row[:-1] for t in segment)
    assert seen["keep"] == everything
    assert set(seen["pad"]) == set(everything)
    assert len(set(seen["drop"])) == len(seen["drop"]) and set(seen["drop"]) <= set(everything)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("remainder", ["pad", "drop", "keep"])
def test_a_position_resumes_any_world_and_batch_size_exactly(pack: bool, remainder: str) -> None:
    store = fake_store(LENGTHS, per_shard=10)
    layout = layout_of(store, 12, pack=pack)
    expected, total = reference(store, layout, 16, pack, remainder, past=21)
    before, position = run(store, layout, 4, 3, 16, pack, remainder, steps=5)
    assert position == 5 * 4 * 3 and sorted(before) == list(range(position))
    after, _ = run(store, layout, 3, 7, 16, pack, remainder, start=position)
    rows = {**before, **after}
    assert not set(before) & set(after)
    assert all(row == expected[g] for g, row in rows.items())  # every row in its place
    covered = {"keep": total, "pad": total, "drop": position + (total - position) // 21 * 21}[remainder]
    assert set(range(covered)) <= set(rows) and (remainder == "pad" or len(rows) == covered)


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("remainder", ["pad", "drop", "keep"])
def test_a_rank_reads_its_share_of_the_shards_plus_the_boundaries(pack: bool, remainder: str) -> None:
    """Under every rule: the epoch's end (pad's wrapped rows, keep's ragged window) reads no other rank's shards,
    and packed rows, whose blocks end within a row of their regions, read only the shard at the boundary."""
    store = fake_store(np.random.default_rng(3).integers(50, 200, size=960).tolist(), per_shard=10)  # 96 shards
    layout = layout_of(store, 48, window=4, pack=pack)
    for world in (2, 4, 8):
        union: set[int] = set()
        for rank in range(world):
            store.shards.pinned_log.clear()
            p = packer(store, layout, rank, world, 2, 64, pack, remainder)
            while p.next_batch() is not None:
                pass
            touched = {s for pinned in store.shards.pinned_log for s in pinned}
            assert len(touched) <= 96 // world + 2, (world, rank, len(touched))
            union |= touched
        assert union == set(range(96))


def test_a_position_of_another_virtual_rank_count_is_refused() -> None:
    store = fake_store(LENGTHS, per_shard=10)
    p = packer(store, layout_of(store, 12), 0, 2, 2, 16, True, "pad")
    with pytest.raises(ValueError, match=r"taken with 12 virtual ranks, but this dataset has 6"):
        packer(store, layout_of(store, 6), 0, 2, 2, 16, True, "pad").set_state(p.get_state())
    assert p.get_state().model_dump() == {"row": 0, "virtual": 12}


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=60), data=st.data(), seq=st.integers(1, 24),
       pack=st.booleans(), remainder=st.sampled_from(["pad", "drop", "keep"]), seeded=st.booleans(),
       completion=st.booleans())
def test_stop_on_one_layout_and_resume_on_another_gives_the_epochs_rows(
        lengths: list[int], data: st.DataObject, seq: int, pack: bool, remainder: str, seeded: bool,
        completion: bool) -> None:
    store = fake_store(lengths, per_shard=data.draw(st.integers(1, 8)),
                       prompts=[data.draw(st.integers(0, n)) for n in lengths])
    virtual = data.draw(st.integers(1, len(lengths)))
    layout = layout_of(store, virtual, seed=7 if seeded else None, window=data.draw(st.integers(1, 3)), pack=pack)
    w1, b1, w2, b2 = (data.draw(st.integers(1, 5)) for _ in range(4))
    expected, total = reference(store, layout, seq, pack, remainder, completion, past=25)
    before, position = run(store, layout, w1, b1, seq, pack, remainder, steps=data.draw(st.integers(0, 6)),
                           completion=completion)
    after, _ = run(store, layout, w2, b2, seq, pack, remainder, start=position, completion=completion)
    assert not set(before) & set(after)
    rows = {**before, **after}
    for g, row in rows.items():
        assert row == expected[g]
    if remainder == "keep":
        assert sorted(rows) == list(range(total))
    elif remainder == "pad":
        assert set(range(total)) <= set(rows)
    else:
        assert set(rows) <= set(range(total))
