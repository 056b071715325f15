"""Curating, mixing and block order: exact accounting, seeded draws, every sample once, resumable."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil_feed.server.errors import Refused
from sigil_feed.server.pipeline.accounting import SourceCounters
from sigil_feed.server.pipeline.curate import CuratedSource, CurateRules, copies, task_copies
from sigil_feed.server.pipeline.mixing import Mixer, interleave
from sigil_feed.server.pipeline.samples import Sample, plain_pair
from sigil_feed.server.pipeline.sources.base import RawRecord, Source, SourceState
from sigil_feed.server.streaming.block_order import Block, BlockShuffle, BlockState


class ListSource(Source):
    """Records from a list, behind the Source interface."""

    def __init__(self, index: int, values: list[dict | None]) -> None:
        self.index, self.values, self.row = index, values, 0
        self.spec, self.files = f"list:{index}", ["mem"]

    def __next__(self) -> RawRecord:
        if self.row >= len(self.values):
            raise StopIteration
        self.row += 1
        value = self.values[self.row - 1]
        return RawRecord(self.index, 0, self.row - 1, f"mem:{self.row}", value,
                         None if value is not None else "bad_json")

    def get_state(self) -> SourceState:
        return SourceState(file=0, row=self.row)

    def set_state(self, state: SourceState) -> None:
        self.row = state.row

    def restart(self) -> None:
        self.row = 0


def texts(n: int, tag: str, task: str = "completion") -> list[dict]:
    return [{"prompt": f"{tag}{i}", "gen": "x", "_task_type": task} for i in range(n)]


def curated(index: int, values: list, task_weights: dict | None = None, seed: int = 0,
            counters: SourceCounters | None = None) -> CuratedSource:
    rules = CurateRules(filter=lambda path, text: None, filter_override=None, splits=frozenset({"train"}),
                        task_weights=task_weights, seed=seed, strict=False, pair_format=plain_pair)
    return CuratedSource(ListSource(index, values), rules, counters or SourceCounters(f"list:{index}"))


def names(samples: list[Sample]) -> list[str]:
    return [s.text.split("\n")[0] for s in samples]


def test_accounting_is_exact_and_counts_each_position_once() -> None:
    counters = SourceCounters("list:0")
    values = [*texts(3, "a"), None, {"text": 5}, {"nothing": 1}, {"prompt": "p", "gen": "g", "_split": "val"}]
    assert len(list(curated(0, values, counters=counters))) == 3
    assert len(list(curated(0, values, counters=counters))) == 3  # a second stream re-reads: not recounted
    assert counters.read == 7 and counters.kept == 3
    assert counters.malformed == {"bad_json": 1, "bad_type": 1, "missing_fields": 1}
    assert counters.dropped == {"other_split": 1}


def test_task_weights_copies_are_seeded_per_sample() -> None:
    values = texts(200, "a", task="rare")
    first = names(list(curated(0, values, {"rare": 1.5}, seed=7)))
    assert first == names(list(curated(0, values, {"rare": 1.5}, seed=7)))
    counts = Counter(first)
    assert set(counts.values()) == {1, 2} and 250 < len(first) < 350
    assert copies(2.0, 0, (0, 0, 0)) == 2


def mix(mode: str, stopping: str = "first_exhausted", sizes: tuple[int, ...] = (3, 5)) -> Mixer:
    children = [curated(i, texts(n, chr(ord("a") + i))) for i, n in enumerate(sizes)]
    return Mixer(children, mode, stopping, [1.0] * len(sizes), seed=1)


def test_sequential_round_robin_and_stopping() -> None:
    assert names(list(mix("sequential"))) == ["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]
    assert names(list(mix("round_robin"))) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    all_out = names(list(mix("round_robin", "all_exhausted")))
    assert all_out == ["a0", "b0", "a1", "b1", "a2", "b2", "a0", "b3", "a1", "b4", "a2"]


def test_weighted_mix_is_seeded_and_follows_weights() -> None:
    def run(seed: int) -> list[str]:
        children = [curated(i, texts(2000, chr(ord("a") + i))) for i in range(2)]
        return names(list(Mixer(children, "weighted", "first_exhausted", [3.0, 1.0], seed=seed)))

    first = run(1)
    assert first == run(1) and first != run(2)
    share = sum(n.startswith("a") for n in first) / len(first)
    assert 0.7 < share < 0.8


def blocks(order: BlockShuffle) -> list[Block]:
    """Every block of the epoch, in turn."""
    out = list(order)
    assert out[-1].last and not any(b.last for b in out[:-1])
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), block=st.integers(1, 16), chars=st.integers(1, 80), seed=st.none() | st.integers(0, 9))
def test_blocks_permute_consecutive_samples_of_the_mix(n: int, block: int, chars: int, seed: int | None) -> None:
    """The epoch's order is every sample of the mix once, each block a permutation of the next samples."""
    order = BlockShuffle(mix("sequential", sizes=(n,)), block_size=block, block_chars=chars, seed=seed, epoch=0)
    mixed, at = names(list(mix("sequential", sizes=(n,)))), 0
    for b in blocks(order):
        assert sorted(names(b.samples)) == sorted(mixed[at:at + len(b.samples)]) and len(b.samples) <= block
        at += len(b.samples)
    assert at == n


def test_blocks_end_at_the_character_bound() -> None:
    """However large the samples, a block holds about block_chars of text: memory stays bounded."""
    def count(block_chars: int) -> int:
        read = blocks(BlockShuffle(mix("sequential", sizes=(40,)), block_size=1000, block_chars=block_chars, seed=1,
                                   epoch=0))
        assert all(sum(len(s.text) for s in b.samples) < block_chars + 6 for b in read)  # samples of 4-6 chars
        return len(read)

    assert count(1 << 20) == 1 and count(40) >= 5


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), block=st.integers(1, 9), chars=st.integers(1, 60), stop=st.integers(0, 40),
       mode=st.sampled_from(["sequential", "round_robin", "weighted"]))
def test_any_block_reads_again_from_its_start(n: int, block: int, chars: int, stop: int, mode: str) -> None:
    """A fresh chain reading block k at its recorded start gets block k, and the blocks after it."""
    def order() -> BlockShuffle:
        return BlockShuffle(mix(mode, "all_exhausted", sizes=(n, n // 2 + 1)), block_size=block, block_chars=chars,
                            seed=3, epoch=1)

    full = blocks(order())
    k = min(stop, len(full) - 1)
    again = order()
    again.set_state(BlockState(block=k, start=full[k].start))
    rest = list(again)
    assert [names(b.samples) for b in rest] == [names(b.samples) for b in full[k:]]


def test_epochs_reshuffle() -> None:
    def epoch(e: int) -> list[str]:
        return [name for b in blocks(BlockShuffle(mix("sequential", sizes=(50,)), block_size=50,
                                                  block_chars=1 << 20, seed=0, epoch=e)) for name in names(b.samples)]

    assert epoch(0) != epoch(1) and sorted(epoch(0)) == sorted(epoch(1)) and epoch(1) == epoch(1)


@settings(max_examples=120, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
       mode=st.sampled_from(["sequential", "round_robin", "weighted"]),
       stopping=st.sampled_from(["first_exhausted", "all_exhausted"]),
       weights=st.lists(st.floats(0.05, 5.0), min_size=4, max_size=4), seed=st.integers(0, 3))
def test_interleave_over_indices_is_the_mixers_sequence(sizes: list[int], mode: str, stopping: str,
                                                        weights: list[float], seed: int) -> None:
    """The cached mode's serve-time mix equals what the streaming Mixer yields over the same samples."""
    children = [curated(i, texts(n, chr(ord("a") + i))) for i, n in enumerate(sizes)]
    expected = [(s.source, s.row) for s in Mixer(children, mode, stopping, weights[:len(sizes)], seed)]
    child, position = interleave(sizes, mode, stopping, weights[:len(sizes)], seed)
    assert list(zip(child.tolist(), position.tolist(), strict=True)) == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize("mode", ["round_robin", "weighted"])
def test_an_empty_source_under_all_exhausted_is_skipped_not_spun_on(mode: str) -> None:
    """A source whose records were all filtered out contributes nothing; the others run until each has run out
    once (the streaming Mixer used to restart the empty source forever)."""
    expected = [(s.source, s.row) for s in mix(mode, "all_exhausted", sizes=(3, 0))]
    assert sorted(expected) == [(0, 0), (0, 1), (0, 2)]
    child, position = interleave([3, 0], mode, "all_exhausted", [1.0, 1.0], 1)
    assert list(zip(child.tolist(), position.tolist(), strict=True)) == expected


@pytest.mark.timeout(20)
@pytest.mark.parametrize("rare", [1e-300, 1e-9])
def test_a_source_too_rarely_drawn_to_ever_run_out_is_refused_not_spun_on(rare: float) -> None:
    """all_exhausted with a weight so small that the layout would draw for ever (1e-300) or for hours (1e-9: a
    billion draws per sample of it) ends FAILED_PRECONDITION naming the weights, as a forged cursor's plan may ask."""
    with pytest.raises(Refused, match="raise the smallest weights or use stopping_strategy: first_exhausted"):
        interleave([60, 60], "weighted", "all_exhausted", [rare, 1.0], 1)
    child, _ = interleave([60, 60], "weighted", "all_exhausted", [0.01, 1.0], 1)  # skewed, yet it ends
    assert np.bincount(child).tolist()[0] == 60 and len(child) > 60 * 50


def test_task_copies_match_per_sample_copies() -> None:
    rng = np.random.default_rng(0)
    task = rng.integers(-1, 3, 500)
    ids = (rng.integers(0, 3, 500), rng.integers(0, 9, 500), np.arange(500))
    weights = {"a": 1.5, "b": 0.0, "c": 3.0}
    got = task_copies(task, ["a", "b", "zz"], weights, 7, ids)
    names = ["a", "b", "zz"]
    want = [copies(weights[names[t]], 7, (s, f, r)) if t >= 0 and names[t] in weights else 1
            for t, s, f, r in zip(task.tolist(), *(c.tolist() for c in ids), strict=True)]
    assert got.tolist() == want
