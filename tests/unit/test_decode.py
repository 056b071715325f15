"""decode_batch on hand-built Batch messages: exact outputs, property checks and malformed input."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sigil_feed.client.decode import IGNORE_INDEX, decode_batch, varlen_kwargs
from sigil_feed.protos import feed_pb2

X = IGNORE_INDEX


def flat(row: list[list[int]]) -> list[int]:
    """The tokens of a row's segments, in order."""
    return list(itertools.chain.from_iterable(row))


def tensor(name: str, values: object, dtype: str) -> feed_pb2.Tensor:
    """A wire Tensor holding `values` as the given numpy dtype."""
    array = np.asarray(values, dtype=np.dtype(dtype))
    return feed_pb2.Tensor(name=name, dtype=array.dtype.str, shape=array.shape, data=array.tobytes())


def packed_batch(rows: list[list[list[int]]], seq_len: int, dtype: str = "<u2", pad_id: int = 0,
                 loss_mask: list[list[int]] | None = None) -> feed_pb2.Batch:
    """A packed Batch whose rows are lists of segments (lists of token ids), padded to seq_len."""
    ids = [flat(row) + [pad_id] * (seq_len - sum(map(len, row))) for row in rows]
    tensors = [tensor("input_ids", ids, dtype),
               tensor("segment_lengths", [len(seg) for row in rows for seg in row], "<i4"),
               tensor("row_segments", [len(row) for row in rows], "<i4")]
    if loss_mask is not None:
        tensors.append(tensor("loss_mask", loss_mask, "|u1"))
    return feed_pb2.Batch(seq=0, epoch=0, tensors=tensors, cursor=b"c")


def padded_batch(ids: list[list[int]], lengths: list[int], loss_mask: list[list[int]] | None = None,
                 dtype: str = "<u2") -> feed_pb2.Batch:
    """A padded Batch with per-row real lengths."""
    tensors = [tensor("input_ids", ids, dtype), tensor("lengths", lengths, "<i4")]
    if loss_mask is not None:
        tensors.append(tensor("loss_mask", loss_mask, "|u1"))
    return feed_pb2.Batch(tensors=tensors)


def assert_arrays(out: dict[str, np.ndarray], **expected: list[list[int]]) -> None:
    """Every output is int64 and equals the expected values exactly."""
    assert set(out) == set(expected)
    for name, values in expected.items():
        assert out[name].dtype == np.int64, name
        np.testing.assert_array_equal(out[name], np.array(values), err_msg=name)


def test_packed_segments_and_cut_sample() -> None:
    """Row 0 ends with the head of a sample whose tail opens row 1; every segment restarts positions."""
    batch = packed_batch([[[1, 2, 3], [4, 5, 6, 7, 8]], [[9, 10], [11, 12, 13, 14, 15, 16]]], seq_len=8)
    assert_arrays(
        decode_batch(batch, pack=True),
        input_ids=[[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]],
        labels=[[X, 2, 3, X, 5, 6, 7, 8], [X, 10, X, 12, 13, 14, 15, 16]],
        position_ids=[[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5]],
    )


def test_packed_padding_at_end_and_empty_row() -> None:
    """Padding after a row's segments is its own position run and never a label."""
    batch = packed_batch([[[1, 2], [3, 4, 5]], [[6, 7, 8]], []], seq_len=6, pad_id=9)
    assert_arrays(
        decode_batch(batch, pack=True),
        input_ids=[[1, 2, 3, 4, 5, 9], [6, 7, 8, 9, 9, 9], [9, 9, 9, 9, 9, 9]],
        labels=[[X, 2, X, 4, 5, X], [X, 7, 8, X, X, X], [X] * 6],
        position_ids=[[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]],
    )


def test_packed_int32_ids_and_loss_mask() -> None:
    """int32 ids above the uint16 range survive; loss_mask == 0 masks prompt tokens."""
    big = 100_000
    batch = packed_batch([[[big, big + 1, big + 2], [big + 3, big + 4]]], seq_len=6, dtype="<i4",
                         loss_mask=[[0, 1, 1, 0, 1, 0]])
    assert_arrays(
        decode_batch(batch, pack=True),
        input_ids=[[big, big + 1, big + 2, big + 3, big + 4, 0]],
        labels=[[X, big + 1, big + 2, X, big + 4, X]],
        position_ids=[[0, 1, 2, 0, 1, 0]],
    )


def test_padded_rows_with_loss_mask() -> None:
    """Padded rows: attention_mask from lengths; labels masked at padding and at loss_mask == 0."""
    ids = [[5, 6, 7, 0], [8, 9, 10, 11], [0, 0, 0, 0]]
    batch = padded_batch(ids, [3, 4, 0], loss_mask=[[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype="<i4")
    assert_arrays(
        decode_batch(batch, pack=False),
        input_ids=ids,
        labels=[[5, 6, 7, X], [X, X, 10, 11], [X, X, X, X]],
        attention_mask=[[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]],
    )


def test_outputs_are_writable_and_own_their_memory() -> None:
    """Outputs can go straight to torch.from_numpy without read-only warnings."""
    out = decode_batch(packed_batch([[[1, 2, 3]]], seq_len=4), pack=True)
    assert all(array.flags.writeable and array.flags.c_contiguous for array in out.values())


@pytest.mark.parametrize(("batch", "pack", "message"), [
    (feed_pb2.Batch(tensors=[tensor("lengths", [1], "<i4")]), False, "no 'input_ids'"),
    (feed_pb2.Batch(tensors=[feed_pb2.Tensor(name="input_ids", dtype="<u2", shape=[2, 2], data=b"\0" * 6)]),
     False, "6 bytes do not fit"),
    (feed_pb2.Batch(tensors=[tensor("input_ids", [[1.0]], "<f4")]), False, "unsupported dtype"),
    (padded_batch([[1, 2]], [3]), False, "do not fit input_ids"),
    (packed_batch([[[1, 2, 3]]], seq_len=3), True, None),
])
def test_malformed_batches_are_rejected(batch: feed_pb2.Batch, pack: bool, message: str | None) -> None:
    """Inconsistent tensors raise ValueError naming the problem instead of decoding garbage."""
    if message is None:
        decode_batch(batch, pack)
        return
    with pytest.raises(ValueError, match=message):
        decode_batch(batch, pack)


def test_packed_segments_overflowing_the_row_are_rejected() -> None:
    """Segments that claim more tokens than seq_len, or that disagree with row_segments, are errors."""
    batch = packed_batch([[[1, 2, 3]]], seq_len=3)
    batch.tensors[1].CopyFrom(tensor("segment_lengths", [4], "<i4"))
    with pytest.raises(ValueError, match="more than seq_len"):
        decode_batch(batch, pack=True)
    batch.tensors[2].CopyFrom(tensor("row_segments", [2], "<i4"))
    with pytest.raises(ValueError, match="do not match row_segments"):
        decode_batch(batch, pack=True)


@st.composite
def packed_rows(draw: st.DrawFn) -> tuple[list[list[list[int]]], int]:
    """Random packed rows: each row a list of non-empty segments fitting seq_len."""
    seq_len = draw(st.integers(1, 24))
    rows = []
    for _ in range(draw(st.integers(1, 5))):
        room, row = seq_len, []
        while room and draw(st.booleans()):
            size = draw(st.integers(1, room))
            row.append(draw(st.lists(st.integers(1, 65535), min_size=size, max_size=size)))
            room -= size
        rows.append(row)
    return rows, seq_len


@settings(max_examples=200, deadline=None)
@given(packed_rows(), st.booleans(), st.randoms(use_true_random=False))
def test_packed_property(case: tuple[list[list[list[int]]], int], with_mask: bool,
                         rng: random.Random) -> None:
    """position_ids restart exactly at segment starts; labels equal input_ids except documented spots."""
    rows, seq_len = case
    mask = [[rng.randint(0, 1) for _ in range(seq_len)] for _ in rows] if with_mask else None
    out = decode_batch(packed_batch(rows, seq_len, loss_mask=mask), pack=True)
    for r, row in enumerate(rows):
        real = sum(map(len, row))
        starts = set(np.cumsum([0] + [len(seg) for seg in row])[:-1].tolist()) if row else set()
        run_starts = starts | ({real} if real < seq_len else set())
        positions, labels, ids = out["position_ids"][r], out["labels"][r], out["input_ids"][r]
        for i in range(seq_len):
            assert positions[i] == (0 if i in run_starts else positions[i - 1] + 1)
            masked = i in starts or i >= real or (mask is not None and mask[r][i] == 0)
            assert labels[i] == (X if masked else ids[i])
        assert ids[:real].tolist() == flat(row)


def flattened(rows: list[list[list[int]]], seq_len: int) -> dict[str, np.ndarray]:
    """sigil-feed's decode of packed rows, flattened to [1, B * L] like DataCollatorWithFlattening's output."""
    out = decode_batch(packed_batch(rows, seq_len), pack=True)
    return {**{name: array.reshape(1, -1) for name, array in out.items()}, **varlen_kwargs(out["position_ids"])}


def assert_same_as_collator(ours: dict[str, np.ndarray], features: list[dict[str, list[int]]]) -> None:
    """Every output of DataCollatorWithFlattening equals ours, dtype and value."""
    from transformers import DataCollatorWithFlattening

    theirs = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=True)(features)
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        if isinstance(value, int):
            assert ours[name] == value, name
        else:
            assert ours[name].dtype == value.numpy().dtype, name
            np.testing.assert_array_equal(ours[name], value.numpy(), err_msg=name)


def test_whole_samples_decode_like_data_collator_with_flattening() -> None:
    """Rows filled exactly by whole samples give the collator's input_ids, labels, position_ids, cu_seq_lens."""
    samples = [[11, 12, 13], [14, 15], [16, 17, 18, 19, 20], [21, 22, 23, 24], [25, 26, 27], [28, 29, 30]]
    assert_same_as_collator(flattened([samples[:3]], seq_len=10), [{"input_ids": s} for s in samples[:3]])
    assert_same_as_collator(flattened([samples[:3], samples[3:]], seq_len=10),
                            [{"input_ids": s} for s in samples])


@settings(max_examples=100, deadline=None)
@given(packed_rows())
def test_any_packed_rows_decode_like_the_collator_over_their_segments(
        case: tuple[list[list[list[int]]], int]) -> None:
    """Documented difference: a row's segments are the collator's examples (a sample cut across rows is two),
    and a row's trailing padding is one more example with no labels."""
    rows, seq_len = case
    features = []
    for row in rows:
        features += [{"input_ids": seg, "labels": seg} for seg in row]
        pad = seq_len - sum(map(len, row))
        if pad:
            features.append({"input_ids": [0] * pad, "labels": [X] * pad})
    assert_same_as_collator(flattened(rows, seq_len), features)
