"""Packing and padding: no token lost or repeated, segments and masks right, resumable mid-sample."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil_feed.server.pipeline.tokenize import Encoded, EncodedBatch
from sigil_feed.server.rows.batch import Rows
from sigil_feed.server.rows.deal import Deal
from sigil_feed.server.rows.spans import MaskedSpans
from sigil_feed.server.streaming.block_order import BlockState
from sigil_feed.server.streaming.encoding import TokenStream
from sigil_feed.server.streaming.packer import Packer
from sigil_feed.server.streaming.shared_reads import EncodedBlock
from tests.unit.streaming_fixtures import mix_at

PAD = 0


def done(value: EncodedBatch) -> Future[EncodedBatch]:
    future: Future[EncodedBatch] = Future()
    future.set_result(value)
    return future


class ListBlocks:
    """Encoded samples as the epoch's blocks (5 samples each, in chunks of 3), behind the interface TokenStream
    reads."""

    def __init__(self, encoded: list[Encoded]) -> None:
        self.epoch_start = mix_at(0)
        self.blocks = []
        for k, first in enumerate(range(0, max(len(encoded), 1), 5)):
            samples = encoded[first:first + 5]
            chunks = [samples[i:i + 3] for i in range(0, len(samples), 3)]
            batches = [EncodedBatch(np.concatenate([e.ids for e in c]), np.cumsum([0, *[len(e.ids) for e in c]]),
                                    MaskedSpans.of([e.masked.reshape(-1).tolist() for e in c])) for c in chunks]
            self.blocks.append(EncodedBlock(k, mix_at(first), mix_at(first + 5), first + 5 >= len(encoded),
                                            len(samples), 0, list(range(0, len(samples), 3)),
                                            [done(b) for b in batches]))
        self.set_state(BlockState(block=0, start=self.epoch_start))

    def set_state(self, state: BlockState, *, units: int | None = 0, taken: int = 0) -> None:
        self.next_index, self.next_start = state.block, state.start  # one mixture: where a block starts is moot

    def __next__(self) -> EncodedBlock:
        if self.next_index >= len(self.blocks):
            raise StopIteration
        block = self.blocks[self.next_index]
        self.next_index, self.next_start = block.index + 1, block.end
        return block


def make_samples(lengths: list[int], prompts: list[int] | None = None,
                 masked: list[list[int]] | None = None) -> list[Encoded]:
    """Samples with globally unique token ids (1, 2, 3, ...) so every token is traceable; each masked over its
    `prompts` leading tokens or its `masked` (start, end) pairs."""
    out, next_id = [], 1
    for i, n in enumerate(lengths):
        spans = masked[i] if masked else [0, prompts[i]] if prompts and prompts[i] else []
        out.append(Encoded(np.arange(next_id, next_id + n, dtype=np.int32), np.array(spans, dtype=np.int32)))
        next_id += n
    return out


def packer(encoded: list[Encoded], batch: int, seq: int, pack: bool = True, completion: bool = False,
           remainder: str = "keep") -> Packer:
    """Rank 0 of 1: every global row, in order."""
    return Packer(TokenStream(ListBlocks(encoded)), Deal(0, 1, batch), seq_len=seq,  # type: ignore[arg-type]
                  pack=pack, completion_only=completion, pad_id=PAD, remainder=remainder)


def drain(p: Packer) -> list[Rows]:
    out = []
    while (rows := p.next_batch()) is not None:
        out.append(rows)
    return out


lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, batch=st.integers(1, 4), seq=st.integers(1, 33))
def test_packing_loses_and_repeats_no_token(lengths: list[int], batch: int, seq: int) -> None:
    encoded = make_samples(lengths)
    batches = drain(packer(encoded, batch, seq))
    real = np.concatenate([b.input_ids.reshape(-1)[: b.tokens] for b in batches])
    assert real.tolist() == list(range(1, sum(lengths) + 1))
    for b in batches[:-1]:
        assert b.input_ids.shape == (batch, seq) and b.tokens == batch * seq


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, batch=st.integers(1, 4), seq=st.integers(1, 33))
def test_segments_follow_sample_and_row_boundaries(lengths: list[int], batch: int, seq: int) -> None:
    encoded = make_samples(lengths)
    starts = set(np.cumsum([0, *lengths[:-1]]).tolist())
    offset = 0
    for b in drain(packer(encoded, batch, seq)):
        assert b.row_segments.sum() == len(b.lengths) and b.lengths.sum() == b.tokens
        bounds = np.cumsum(np.concatenate([[0], b.lengths[:-1]])) + offset
        row_starts = set(range(offset, offset + b.tokens, seq))
        assert set(bounds.tolist()) == (starts | row_starts) & set(range(offset, offset + b.tokens))
        per_row = np.split(b.lengths, np.cumsum(b.row_segments)[:-1])
        assert all(r.sum() == seq for r in per_row[:-1])
        offset += batch * seq


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, batch=st.integers(1, 3), seq=st.integers(1, 20), pack=st.booleans(),
       stop=st.integers(0, 10))
def test_resume_from_any_batch_gives_the_same_rest(lengths: list[int], batch: int, seq: int, pack: bool,
                                                   stop: int) -> None:
    encoded = make_samples(lengths)
    full = drain(packer(encoded, batch, seq, pack))
    first = packer(encoded, batch, seq, pack)
    for _ in range(min(stop, len(full))):
        first.next_batch()
    resumed = packer(encoded, batch, seq, pack)
    resumed.set_state(first.get_state())
    rest = drain(resumed)
    assert [r.input_ids.tolist() for r in rest] == [r.input_ids.tolist() for r in full[min(stop, len(full)):]]


def test_padded_rows_truncate_and_report_lengths() -> None:
    rows = drain(packer(make_samples([3, 10, 5]), batch=2, seq=4, pack=False))
    assert rows[0].input_ids.tolist() == [[1, 2, 3, PAD], [4, 5, 6, 7]]
    assert rows[0].lengths.tolist() == [3, 4]
    assert rows[1].input_ids.tolist() == [[14, 15, 16, 17]] and rows[1].tokens == 4


def test_completion_only_masks_prompt_tokens_even_across_rows() -> None:
    rows = drain(packer(make_samples([6, 4], prompts=[5, 2]), batch=1, seq=4, completion=True))
    masks = np.concatenate([r.loss_mask.reshape(-1)[: r.tokens] for r in rows]).tolist()
    assert masks == [0, 0, 0, 0, 0, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("pack", [True, False])
def test_completion_only_masks_every_turn_of_a_conversation_across_rows(pack: bool) -> None:
    """Several masked ranges per sample (a conversation's turns other than the assistant's), cut anywhere."""
    masked = [[0, 3, 5, 7, 9, 11], [1, 2], [], [0, 4]]
    rows = drain(packer(make_samples([11, 4, 3, 6], masked=masked), batch=1, seq=5, completion=True, pack=pack))
    masks = [r.loss_mask.reshape(-1)[: r.tokens].tolist() for r in rows]
    want = [[0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1], [0, 0, 0, 0, 1, 1]]
    if pack:
        assert [m for row in masks for m in row] == [m for sample in want for m in sample]
    else:
        assert masks == [w[:5] for w in want]
