"""Shared block reads: every rank gets exactly what it reads alone, the cache stays bounded, one read per block."""

from __future__ import annotations

import threading
from functools import cache, partial
from itertools import zip_longest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil_feed.server.pipeline.tokenize import Encoder
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.streaming.block_order import BlockShuffle
from sigil_feed.server.streaming.encoding import TokenizedBlocks
from sigil_feed.server.streaming.shared_reads import BlockCache, EncodedBlock, SharedReads, block_key
from tests.conftest import TOKENIZER_DIR
from tests.unit.streaming_fixtures import mix_at
from tests.unit.test_order_mixing import mix


@cache
def encoder() -> Encoder:
    """The bundled tokenizer, loaded here (as a dataset loads it when opened), not first in an encode thread."""
    loaded = Encoder(str(TOKENIZER_DIR))
    loaded.choose_backend()
    return loaded


def chain(shared: BlockCache | None, *, runtime: Runtime, n: int, block: int, chars: int, seed: int | None,
          mode: str) -> TokenizedBlocks:
    order = BlockShuffle(mix(mode, "all_exhausted", sizes=(n, n // 2 + 1)), block_size=block, block_chars=chars,
                         seed=seed, epoch=1)
    return TokenizedBlocks(order, encoder(), with_prompts=False, on_encoded=lambda samples, encoded: None,
                           encode_pool=runtime.encode_pool, read_pool=runtime.read_pool, shared=shared)


def tokens(block: EncodedBlock) -> tuple[int, list[int]]:
    """A block's index and token ids."""
    return block.index, [t for chunk in block.chunks for t in chunk.result().ids.tolist()]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), block=st.integers(1, 9), chars=st.integers(1, 60), world=st.integers(1, 4),
       seed=st.none() | st.integers(0, 9), mode=st.sampled_from(["sequential", "round_robin", "weighted"]),
       blocks=st.integers(1, 3), schedule=st.lists(st.integers(0, 7), max_size=200))
def test_shared_reads_give_every_rank_what_it_reads_alone(runtime: Runtime, n: int, block: int, chars: int,
                                                          world: int, seed: int | None, mode: str, blocks: int,
                                                          schedule: list[int]) -> None:
    """Ranks step in any interleaving (some resuming from their position on a new chain, some far behind the
    others, so that their blocks were dropped): each gets the blocks it gets reading alone, and the cache never
    holds more than its bound."""
    make = partial(chain, runtime=runtime, n=n, block=block, chars=chars, seed=seed, mode=mode)
    alone = [tokens(b) for b in make(None)]
    cache = SharedReads(blocks=blocks).cache(world, block_chars=chars)
    ranks = [make(cache) for _ in range(world)]
    got: list[list[tuple[int, list[int]]]] = [[] for _ in range(world)]
    for step in schedule + [r for r in range(world) for _ in range(len(alone) + 1)]:
        rank = step % world
        if step % (2 * world) >= world:  # resume this rank at its next block on a fresh chain
            fresh = make(cache)
            fresh.set_state(ranks[rank].get_state())
            fresh.finished = ranks[rank].finished  # past the last block: nothing more, not an empty one
            ranks[rank] = fresh
        got[rank] += [tokens(b) for b in [next(ranks[rank], None)] if b is not None]
        assert len(cache.entries) <= cache.max_blocks and cache.chars <= cache.max_chars
    assert got == [alone] * world


def test_a_stalled_rank_costs_a_bounded_cache_and_reads_alone_later(runtime: Runtime) -> None:
    """One rank takes nothing while the others read the whole epoch: the cache holds at most its bound, and the
    stalled rank, whose blocks are gone, reads them itself and gets what it gets alone."""
    world = 3
    make = partial(chain, runtime=runtime, n=300, block=6, chars=1 << 20, seed=5, mode="round_robin")
    shared = SharedReads(blocks=2)
    cache = shared.cache(world, block_chars=1 << 20)
    ranks = [make(cache) for _ in range(world)]
    held = 0
    for _ in zip_longest(ranks[0], ranks[1]):  # two ranks in step, the third stalled
        held = max(held, len(cache.entries))
    assert 0 < held <= 2 and len(cache.entries) <= 2
    read = shared.counts.blocks_read
    assert [tokens(b) for b in ranks[2]] == [tokens(b) for b in make(None)]
    assert shared.counts.blocks_read > read  # the dropped blocks were read again
    assert shared.counts.blocks_shared >= read  # rank 1 took every block rank 0 read


def test_a_block_is_encoded_once_for_all_ranks(runtime: Runtime) -> None:
    """Ranks in step share the read and the encoding: each block is read once and taken by the others."""
    encoded: list[int] = []
    shared = SharedReads()
    cache = shared.cache(4, block_chars=1 << 20)
    order = partial(BlockShuffle, block_size=7, block_chars=1 << 20, seed=1, epoch=0)
    ranks = [TokenizedBlocks(order(mix("sequential", sizes=(40,))), encoder(), with_prompts=False,
                             on_encoded=lambda samples, _: encoded.append(len(samples)),
                             encode_pool=runtime.encode_pool, read_pool=runtime.read_pool, shared=cache)
             for _ in range(4)]
    results = [[tokens(b) for b in rank] for rank in ranks]
    assert results == [results[0]] * 4 and len(results[0]) == 6
    assert sum(encoded) == 40 and shared.counts.blocks_read == 6 and shared.counts.blocks_shared == 18
    assert not cache.entries and cache.chars == 0  # every rank took every block: nothing held


def one_block() -> EncodedBlock:
    return EncodedBlock(0, mix_at(0), mix_at(4), False, 4, 8, [], [])


def never() -> EncodedBlock:
    raise AssertionError("read again, though the block was there to share")


def test_ranks_asking_for_a_block_being_read_wait_for_that_one_read() -> None:
    shared = SharedReads()
    cache = shared.cache(2, block_chars=100)
    key = block_key(0, 0, mix_at(0))
    release, got = threading.Event(), {}

    def slow_read() -> EncodedBlock:
        release.wait(30)
        return one_block()

    def take(rank: int) -> None:
        got[rank] = cache.take(key, slow_read if rank == 0 else never)

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
    assert got[0] is got[1]
    assert (shared.counts.blocks_read, shared.counts.blocks_shared) == (1, 1)
    assert not cache.entries and cache.chars == 0  # both ranks took it: nothing held


def test_a_failed_read_leaves_the_block_to_the_next_rank() -> None:
    shared = SharedReads()
    cache = shared.cache(2, block_chars=100)
    key = block_key(0, 0, mix_at(0))

    def broken() -> EncodedBlock:
        raise OSError("disk gone")

    with pytest.raises(OSError):
        cache.take(key, broken)
    assert not cache.reading
    block = cache.take(key, one_block)
    assert cache.take(key, never) is block
