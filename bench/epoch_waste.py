"""Cached mode's waste at the end of an epoch: what `pad` repeats and `drop` loses, against one global step.

A synthetic token store (tests/unit/cached_store.py's `fake_store`: every token id unique, so every served
token and sample is traceable) of heavy-tailed sample lengths over SHARDS shards is served for one epoch by
every rank of a layout, through the real CachedPacker; the rows are counted back to samples (padded rows) or
tokens (packed rows). The bound is one step: `world_size x batch_size` rows (x seq_len tokens when packed).

`python -m bench.epoch_waste` prints every case; `python -m bench` records the worst case of each rule.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from bench.common import Metric
from sigil_feed.server.cached.layout import epoch_layout
from sigil_feed.server.cached.packer import CachedPacker
from sigil_feed.server.rows.deal import Deal
from tests.unit.cached_store import fake_store

SAMPLES = 72_011
SHARDS = 256
SEQ_LEN = 512
WORLD, BATCH = 8, 4  # one step: 32 rows
VIRTUAL = (48, 720)


def heavy_tailed_lengths(count: int, seed: int = 0) -> list[int]:
    """Lognormal sample lengths (median 20 tokens, about a fifth of 1-5 tokens, a few thousands long)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(20), 1.6, size=count)), 1, 8192).astype(np.int64).tolist()


def served_units(store: Any, layout: Any, *, pack: bool, remainder: str) -> tuple[np.ndarray, int]:
    """Every rank's epoch through CachedPacker: the served units (token ids packed, sample indices padded) and
    the rows served."""
    starts = np.cumsum(store.lengths) - store.lengths + 1  # token ids are 1, 2, 3, ... in store order
    served, rows = [], 0
    for rank in range(WORLD):
        packer = CachedPacker(store, layout, Deal(rank, WORLD, BATCH), seq_len=SEQ_LEN, pack=pack,
                              completion_only=False, pad_id=0, remainder=remainder)
        while (batch := packer.next_batch()) is not None:
            rows += batch.input_ids.shape[0]
            if pack:
                served.append(batch.input_ids[batch.input_ids != 0].astype(np.int64))
            else:
                served.append(np.searchsorted(starts, batch.input_ids[:, 0].astype(np.int64), side="right") - 1)
    return np.concatenate(served), rows




def measure_cases(samples: int = SAMPLES) -> list[dict[str, Any]]:
    """pad's repeats and drop's losses per (pack, V), as fractions of the epoch and in steps."""
    store = fake_store(heavy_tailed_lengths(samples), per_shard=-(-samples // SHARDS))
    cases = []
    for pack in (False, True):
        units = int(store.lengths.sum()) if pack else samples
        step = WORLD * BATCH * (SEQ_LEN if pack else 1)
        for virtual in VIRTUAL:
            layout = epoch_layout(store, np.arange(samples), virtual=virtual, seed=0, epoch=0, window_shards=4,
                                  pack=pack)
            case: dict[str, Any] = {"pack": pack, "virtual": virtual, "epoch_units": units, "step_units": step}
            for remainder in ("pad", "drop", "keep"):
                got, rows = served_units(store, layout, pack=pack, remainder=remainder)
                distinct = len(np.unique(got))
                case[remainder] = {"rows": rows, "served": len(got), "distinct": distinct,
                                   "repeated": len(got) - distinct, "lost": units - distinct}
            case["pad_repeat_fraction"] = case["pad"]["repeated"] / units
            case["drop_loss_fraction"] = case["drop"]["lost"] / units
            case["pad_repeat_steps"] = case["pad"]["repeated"] / step
            case["drop_loss_steps"] = case["drop"]["lost"] / step
            cases.append(case)
    return cases


def measure(samples: int = SAMPLES) -> list[Metric]:
    """epoch_pad_repeat_fraction and epoch_drop_loss_fraction: the worst case over pack and V, against one step
    (as a fraction of the same epoch); the ratio is the waste in steps, under 1 when the bound holds."""
    cases = measure_cases(samples)
    metrics = []
    for name, key, rule in (("epoch_pad_repeat_fraction", "pad_repeat", "pad"),
                            ("epoch_drop_loss_fraction", "drop_loss", "drop")):
        worst = max(cases, key=lambda c, k=key: c[f"{k}_steps"])  # type: ignore[misc]
        text = "; ".join(f"{'packed' if c['pack'] else 'padded'} V={c['virtual']}: {c[f'{key}_fraction']:.2e} "
                         f"({c[f'{key}_steps']:.2f} steps)" for c in cases)
        metrics.append(Metric(
            name, worst[f"{key}_fraction"], worst["step_units"] / worst["epoch_units"], "fraction of the epoch",
            "<= 1", mode="cached",
            notes=(f"`{rule}`: {'tokens' if worst['pack'] else 'samples'} {'repeated' if rule == 'pad' else 'lost'} "
                   f"over the epoch's, worst of packed/padded x V {VIRTUAL} (baseline: one step, {WORLD} ranks x "
                   f"{BATCH} rows{f' x {SEQ_LEN} tokens' if worst['pack'] else ''}, over the same epoch; the bound "
                   f"is a ratio under 1); {samples} heavy-tailed samples in {SHARDS} shards; {text}"),
            details={"cases": cases}))
    return metrics


def main() -> int:
    for case in measure_cases(int(sys.argv[1]) if len(sys.argv) > 1 else SAMPLES):
        print(f"{'packed' if case['pack'] else 'padded'} V={case['virtual']:>4}: "
              f"pad repeats {case['pad_repeat_fraction']:.4%} ({case['pad_repeat_steps']:.2f} steps), "
              f"drop loses {case['drop_loss_fraction']:.4%} ({case['drop_loss_steps']:.2f} steps); "
              f"keep lost {case['keep']['lost']} repeated {case['keep']['repeated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
