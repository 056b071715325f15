"""Node-aware dealing (rows/deal.py): rank r of w takes the residue class whose run of regions is the r-th, so
the L consecutive ranks of a node (torchrun's numbering) read one contiguous run of regions, their share; the
rows of every step, and what a position means, are those of the plain rule (rank r: start + r, start + r + w, ...)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil_feed.server.cached.layout import AUTO_VIRTUAL, digit_reversal, node_regions, runs
from sigil_feed.server.rows.deal import Deal, node_order
from tests.unit.cached_store import fake_store, layout_of, packer

LOCAL = 8


def epoch_rows(deal: Deal, total: int, remainder: str) -> np.ndarray:
    """Every row `deal`'s rank takes in an epoch of `total` rows, from position 0."""
    out, start = [], 0
    while len(rows := deal.batch(start, total, remainder)) or start < total:
        out.append(rows)
        start += deal.window
    return np.concatenate(out)


@pytest.mark.parametrize("virtual", [48, 96, 1536, 3072])
@pytest.mark.parametrize("world", [8, 16, 32, 64])
@pytest.mark.parametrize("remainder", ["keep", "pad"])
def test_each_node_reads_one_contiguous_run_of_its_share_of_the_regions(virtual: int, world: int,
                                                                        remainder: str) -> None:
    region = digit_reversal(virtual)
    total = 2 * virtual + 3 * world + 5  # a ragged last window
    ranks = [region[epoch_rows(Deal(r, world, 4, virtual), total, remainder) % virtual] for r in range(world)]
    if node_order(world, virtual) is None:  # w not a prefix product of V's factors: the plain rule (fallback)
        assert virtual % world  # here only w that does not divide V (48: 32, 64; 96: 64)
        for r in range(world):
            assert (Deal(r, world, 4, virtual).rows(world * 4) == world * 4 + r + world * np.arange(4)).all()
        return
    per_run = virtual // world
    for r, regions in enumerate(ranks):  # rank r reads the r-th run
        assert set(regions.tolist()) == set(range(r * per_run, (r + 1) * per_run))
    for k in range(world // LOCAL):
        node = np.unique(np.concatenate(ranks[k * LOCAL:(k + 1) * LOCAL]))
        assert runs(node) == 1
        assert len(node) / virtual == LOCAL / world  # the node's share: 1 / (w / L)
        assert (node == node_regions(virtual, world, LOCAL)[k]).all()


@pytest.mark.parametrize("virtual", AUTO_VIRTUAL)
def test_every_auto_choice_gives_its_power_of_two_world_sizes_one_run_per_node(virtual: int) -> None:
    for world in (w for w in (8, 16, 32, 64, 128, 256, 512, 1024) if virtual % w == 0):
        nodes = node_regions(virtual, world, LOCAL)
        assert [runs(n) for n in nodes] == [1] * len(nodes)
        assert all(len(n) * world == virtual * LOCAL for n in nodes)


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 48, 64, 96, 720])
def test_node_order_is_the_inverse_of_the_world_sizes_digit_reversal(world: int) -> None:
    for virtual in (48, 96, 720, 3072, 322560):
        order = node_order(world, virtual)
        if order is not None:
            assert (digit_reversal(world)[order] == np.arange(world)).all()


@settings(max_examples=300, deadline=None)
@given(virtual=st.sampled_from([1, 2, 4, 6, 12, 48, 96, 720, 3072]), world=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]),
       batch=st.integers(1, 5), start=st.integers(0, 500), total=st.integers(0, 600),
       remainder=st.sampled_from(["keep", "pad", "drop"]))
def test_a_steps_rows_are_the_plain_rules_each_once_from_any_position(virtual: int, world: int, batch: int,
                                                                      start: int, total: int, remainder: str) -> None:
    """From any position (one of another world or batch size included), the ranks' rows of a step are the
    plain rule's, each taken by exactly one rank (so 1 rank with the whole window delivers the same rows)."""
    node = [Deal(r, world, batch, virtual).batch(start, total, remainder) for r in range(world)]
    plain = [Deal(r, world, batch).batch(start, total, remainder) for r in range(world)]
    whole = Deal(0, 1, world * batch, virtual).batch(start, total, remainder)
    taken = np.concatenate(node)
    assert len(set(taken.tolist())) == len(taken)
    assert sorted(taken.tolist()) == sorted(np.concatenate(plain).tolist()) == whole.tolist()
    assert all((np.diff(rows) > 0).all() for rows in node)  # ascending: keep's ragged batch is a prefix


def test_a_nodes_shards_are_about_its_share_of_the_store_through_the_packer() -> None:
    """Through the real CachedPacker over a 64-shard store (V 96, 32 ranks of 4 nodes): each node pins about a
    quarter of the shards (its run, plus a shard at each end), where the plain rule's scattered runs pin more."""
    store = fake_store([3 + (i * 7) % 40 for i in range(96 * 40)], per_shard=60)
    layout = layout_of(store, 96, window=2)
    shards = len(store.manifest.shards)

    def node_shards(rule_virtual: int) -> list[int]:
        out = []
        for k in range(32 // LOCAL):
            store.shards.pinned_log.clear()
            for r in range(k * LOCAL, (k + 1) * LOCAL):
                p = packer(store, layout, r, 32, 2, 64, True, "pad")
                p.deal = Deal(r, 32, 2, rule_virtual)
                while p.next_batch() is not None:
                    pass
            out.append(len({s for pinned in store.shards.pinned_log for s in pinned}))
        return out

    node_aware, plain = node_shards(96), node_shards(1)
    assert max(node_aware) <= shards * LOCAL // 32 + 2
    assert max(node_aware) < min(plain)


def test_the_locality_command_prints_each_world_sizes_rule_and_node_share(capsys: pytest.CaptureFixture[str]) -> None:
    from sigil_feed.server.cli.main import main

    assert main(["locality", "--virtual", "48", "--world", "16", "--world", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:6] == ["16", "2", "node-aware", "1", "0.5000", "0.5000"]
    assert lines[3].split()[:3] == ["32", "4", "plain"]
