"""The benchmark's measure of how well the shard-aware order shuffles (bench/shuffle_quality.py)."""

from __future__ import annotations

import numpy as np

from bench.shuffle_quality import delivery_positions, shuffle_quality

from .cached_store import fake_store, layout_of

LENGTHS = np.random.default_rng(0).integers(1, 40, size=300).tolist()


def test_shuffle_quality_reports_the_layout_against_a_global_permutation() -> None:
    store = fake_store(LENGTHS * 4, per_shard=8)
    layout = layout_of(store, 24)
    positions = delivery_positions(layout)
    assert sorted(positions.tolist()) == sorted(set(positions.tolist()))
    q = shuffle_quality(store, np.arange(1200), virtual=24, seed=1, epoch=0, window_shards=4)
    assert 0 < q["p10"] <= q["median"] < 1 and 0 < q["global_p10"] <= q["global_median"] < 1
