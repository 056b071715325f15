"""Shared block reads: every rank gets exactly what it reads alone, the cache stays bounded, one read per block."""

from __future__ import annotations

import threading
from functools import partial
from itertools import zip_longest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil_feed.server.order import BlockShuffle
from sigil_feed.server.samples import Sample
from sigil_feed.server.shared_read import Block, BlockCache, SharedReads, block_key
from tests.unit.test_order_mixing import mix, names


def order(rank: int, world: int, shared: BlockCache | None, *, n: int, block: int, chars: int, seed: int | None,
          mode: str) -> BlockShuffle:
    return BlockShuffle(mix(mode, "all_exhausted", sizes=(n, n // 2 + 1)), block_size=block, block_chars=chars,
                        seed=seed, epoch=1, rank=rank, world_size=world, shared=shared)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 50), block=st.integers(1, 9), chars=st.integers(1, 60), world=st.integers(1, 4),
       seed=st.none() | st.integers(0, 9), mode=st.sampled_from(["sequential", "round_robin", "weighted"]),
       blocks=st.integers(1, 3), schedule=st.lists(st.integers(0, 7), max_size=300))
def test_shared_reads_give_every_rank_what_it_reads_alone(n: int, block: int, chars: int, world: int,
                                                          seed: int | None, mode: str, blocks: int,
                                                          schedule: list[int]) -> None:
    """Ranks step in any interleaving (some resuming from their state on a new chain, some far behind the others,
    so that their blocks were evicted): each gets the sequence it gets reading alone, and the cache never holds
    more than its bound."""
    size = -(-block // world) * world
    chain = partial(order, n=n, block=size, chars=chars, seed=seed, mode=mode)
    alone = [names(list(chain(r, world, None))) for r in range(world)]
    cache = SharedReads(blocks=blocks).cache(world, block_size=size, block_chars=chars)
    orders = [chain(r, world, cache) for r in range(world)]
    got: list[list[str]] = [[] for _ in range(world)]
    for step in schedule + [r for r in range(world) for _ in range(len(alone[r]) + 1)]:
        rank = step % world
        if step % (2 * world) >= world:  # resume this rank from its state on a fresh chain
            fresh = chain(rank, world, cache)
            fresh.set_state(orders[rank].get_state())
            orders[rank] = fresh
        got[rank] += names([s for s in [next(orders[rank], None)] if s is not None])
        assert cache.samples <= cache.max_samples and cache.chars <= cache.max_chars
    assert got == alone


def test_a_stalled_rank_costs_a_bounded_cache_and_reads_alone_later() -> None:
    """One rank takes nothing while the others read the whole epoch: the cache holds at most its bound, and the
    stalled rank, whose blocks are gone, reads them itself and gets what it gets alone."""
    world, size = 3, 6
    chain = partial(order, n=300, block=size, chars=1 << 20, seed=5, mode="round_robin")
    shared = SharedReads(blocks=2)
    cache = shared.cache(world, block_size=size, block_chars=1 << 20)
    orders = [chain(r, world, cache) for r in range(world)]
    held = 0
    for _ in zip_longest(orders[0], orders[1]):  # two ranks in step, the third stalled
        held = max(held, cache.samples)
    assert 0 < held <= 2 * size and cache.samples <= 2 * size
    blocks = shared.counts.blocks_read
    assert names(list(orders[2])) == names(list(chain(2, world, None)))
    assert shared.counts.blocks_read > blocks  # the evicted blocks were read again
    assert shared.counts.blocks_shared >= blocks  # rank 1 took every block rank 0 read


def one_block() -> Block:
    """A block of four samples s0..s3 dealt to two ranks."""
    samples = [Sample(0, 0, i, f"s{i}", "text") for i in range(4)]
    return Block([samples[0::2], samples[1::2]], {"end": 1}, False, 4)


def never() -> Block:
    raise AssertionError("read again, though the block was there to share")


def texts(share: list[Sample]) -> list[str]:
    return [s.text for s in share]


def test_ranks_asking_for_a_block_being_read_wait_for_that_one_read() -> None:
    shared = SharedReads()
    cache = shared.cache(2, block_size=4, block_chars=100)
    key = block_key(0, 0, {"at": 0})
    release, got = threading.Event(), {}

    def slow_read() -> Block:
        release.wait(30)
        return one_block()

    def take(rank: int) -> None:
        got[rank] = texts(cache.share(key, rank, slow_read if rank == 0 else never).samples)

    reader = threading.Thread(target=take, args=(0,))
    reader.start()
    while key not in cache.reading:
        reader.join(0.01)
    waiter = threading.Thread(target=take, args=(1,))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # it waits for the read in progress rather than reading again
    release.set()
    reader.join(30)
    waiter.join(30)
    assert got == {0: ["s0", "s2"], 1: ["s1", "s3"]}
    assert (shared.counts.blocks_read, shared.counts.blocks_shared) == (1, 1)
    assert not cache.entries and cache.samples == 0  # every share taken: nothing held


def test_a_failed_read_leaves_the_block_to_the_next_rank() -> None:
    shared = SharedReads()
    cache = shared.cache(2, block_size=4, block_chars=100)
    key = block_key(0, 0, {"at": 0})

    def broken() -> Block:
        raise OSError("disk gone")

    with pytest.raises(OSError):
        cache.share(key, 0, broken)
    assert not cache.reading and texts(cache.share(key, 1, one_block).samples) == ["s1", "s3"]
    assert texts(cache.share(key, 0, never).samples) == ["s0", "s2"]


def test_a_twin_rank_reads_its_share_again() -> None:
    """Two streams of the same rank (two jobs of one world size): the second reads the block itself."""
    shared = SharedReads()
    cache = shared.cache(2, block_size=4, block_chars=100)
    key = block_key(0, 0, {"at": 0})
    assert texts(cache.share(key, 0, one_block).samples) == ["s0", "s2"]
    assert texts(cache.share(key, 0, one_block).samples) == ["s0", "s2"]
    assert shared.counts.blocks_read == 2 and texts(cache.share(key, 1, never).samples) == ["s1", "s3"]
