"""Per-sample loss masks as token spans: the [start, end) token ranges of each sample that are not trained on.

One flat array of (start, end) pairs for all samples, relative to each sample's first token, and per-sample
offsets into it (in pairs): a pair's prompt is one span, a conversation has one per turn that is not the
assistant's, a sample trained on whole has none. The mask of any run of tokens is computed from them with
vectorised numpy (`loss_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For counts c: (owner of each of the sum(c) items, its index within its owner)."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)


@dataclass(frozen=True)
class MaskedSpans:
    """Sample i's masked token ranges are `bounds[2 * offsets[i]:2 * offsets[i + 1]]`, as (start, end) pairs."""

    bounds: np.ndarray  # int32, flat (start, end) pairs, sorted and disjoint per sample
    offsets: np.ndarray  # int64, samples + 1, in pairs

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def none(cls, samples: int) -> MaskedSpans:
        """No masked tokens in any of `samples` samples."""
        return cls(np.zeros(0, dtype=np.int32), np.zeros(samples + 1, dtype=np.int64))

    @classmethod
    def of(cls, per_sample: list[list[int]]) -> MaskedSpans:
        """From each sample's flat (start, end) pairs."""
        counts = np.fromiter((len(s) // 2 for s in per_sample), np.int64, len(per_sample))
        bounds = np.fromiter((b for s in per_sample for b in s), np.int32, int(counts.sum()) * 2)
        return cls(bounds, np.concatenate(([0], np.cumsum(counts))))

    def counts(self) -> np.ndarray:
        """Spans per sample."""
        return np.diff(self.offsets)

    def sample(self, i: int) -> np.ndarray:
        """Sample i's spans as a (k, 2) array."""
        return self.bounds[2 * int(self.offsets[i]):2 * int(self.offsets[i + 1])].reshape(-1, 2)

    @staticmethod
    def concat(parts: list[MaskedSpans]) -> MaskedSpans:
        """Several runs of samples' spans, one after another."""
        if not parts:
            return MaskedSpans.none(0)
        counts = np.concatenate([p.counts() for p in parts])
        return MaskedSpans(np.concatenate([p.bounds for p in parts]), np.concatenate(([0], np.cumsum(counts))))

    def split_prefix(self) -> tuple[np.ndarray, MaskedSpans]:
        """(tokens of each sample's leading masked span, 0 if none; the other spans): how a store keeps them."""
        first, nonempty = self.offsets[:-1], self.counts() > 0
        has = np.zeros(len(self), dtype=bool)
        has[nonempty] = self.bounds[2 * first[nonempty]] == 0
        prefix = np.zeros(len(self), dtype=np.int32)
        prefix[has] = self.bounds[2 * first[has] + 1]
        keep = np.ones(len(self.bounds) // 2, dtype=bool)
        keep[first[has]] = False
        counts = self.counts() - has
        bounds = self.bounds.reshape(-1, 2)[keep].reshape(-1)
        return prefix, MaskedSpans(bounds, np.concatenate(([0], np.cumsum(counts))))

    @staticmethod
    def join_prefix(prefix: np.ndarray, rest: MaskedSpans) -> MaskedSpans:
        """The inverse of split_prefix: a leading span [0, prefix) (where > 0) before each sample's other spans."""
        has = (np.asarray(prefix) > 0).astype(np.int64)
        counts = has + rest.counts()
        offsets = np.concatenate(([0], np.cumsum(counts)))
        bounds = np.empty(2 * int(offsets[-1]), dtype=np.int32)
        lead = offsets[:-1][has == 1]
        bounds[2 * lead], bounds[2 * lead + 1] = 0, np.asarray(prefix)[has == 1]
        owner, within = _expand(rest.counts())
        target = offsets[:-1][owner] + has[owner] + within
        bounds[2 * target], bounds[2 * target + 1] = rest.bounds[0::2], rest.bounds[1::2]
        return MaskedSpans(bounds, offsets)


def loss_mask(spans: MaskedSpans, sample: np.ndarray, offset: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The uint8 loss mask (1 = trained) of runs of tokens laid end to end: run r is `count[r]` tokens of sample
    `sample[r]` of `spans`, from its token `offset[r]` on."""
    count = np.asarray(count, dtype=np.int64)
    if not len(spans.bounds):  # nothing masked in any sample (completion_only off): every token trained
        return np.ones(int(count.sum()), dtype=np.uint8)
    offset = np.asarray(offset, dtype=np.int64)
    starts = np.cumsum(count) - count
    run, within = _expand(spans.counts()[sample])
    pair = spans.offsets[sample][run] + within
    lo = np.clip(spans.bounds[2 * pair] - offset[run], 0, count[run])
    hi = np.clip(spans.bounds[2 * pair + 1] - offset[run], 0, count[run])
    real = lo < hi
    size, first = int(count.sum()) + 1, starts[run]
    edges = np.bincount((first + lo)[real], minlength=size) - np.bincount((first + hi)[real], minlength=size)
    return (np.cumsum(edges[:-1]) == 0).astype(np.uint8)
