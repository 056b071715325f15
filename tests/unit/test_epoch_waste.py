"""An epoch's waste is less than one global step, in both modes, for every V, world size, `pack` and `remainder`.

`pad` repeats fewer than `world_size x batch_size` rows (only what completes the last step), `drop` skips
fewer (only the last partial step; a packed stream's partial last row is a real row), `keep` is exact; over
corpora of heavy-tailed sample lengths (lognormal and Pareto: many 1-5 token samples, a few long ones), where
the old per-virtual-rank `pad`/`drop` repeated or lost most of an epoch. The global batches are the same on
every layout of one global batch, and a run stopped at any step resumes on another world size exactly.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sigil_feed.server.cached.layout import virtual_ranks
from sigil_feed.server.config import parse_config
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.runtime import Runtime
from tests.conftest import TOKENIZER_DIR, write_jsonl
from tests.unit.cached_store import fake_store, layout_of, run
from tests.unit.streaming_fixtures import encoder, small_tokenize_chunks  # noqa: F401 (an autouse fixture)
from tests.unit.test_global_rows import SEQ
from tests.unit.test_global_rows import run as run_streaming


def heavy_tailed(count: int, seed: int, shape: str, spread: float, longest: int) -> list[int]:
    """`count` sample lengths from a lognormal (median 4) or Pareto (minimum 1) law, clipped to [1, longest]."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(np.log(4), spread, count) if shape == "lognormal" else rng.pareto(1 / spread, count) + 1
    return np.clip(np.rint(raw), 1, longest).astype(np.int64).tolist()


corpora = st.builds(heavy_tailed, count=st.integers(1, 240), seed=st.integers(0, 1 << 16),
                    shape=st.sampled_from(["lognormal", "pareto"]), spread=st.floats(0.5, 2.0),
                    longest=st.just(400))


def units(store: Any, rows: dict[int, Any], pack: bool) -> Counter[int]:
    """What the rows hold: every token id (packed), or the sample of each row (padded; ids are 1, 2, ... in
    store order, so a row's first id names its sample)."""
    if pack:
        return Counter(t for row in rows.values() for segment in row[:-1] for t in segment)
    starts = np.cumsum(store.lengths) - store.lengths + 1
    return Counter(int(np.searchsorted(starts, row[0][0], side="right")) - 1 for row in rows.values())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=corpora, setting=st.sampled_from([1, 2, 6, 48, "auto"]), world=st.integers(1, 8),
       batch=st.integers(1, 4), seq=st.sampled_from([8, 16, 64]), pack=st.booleans(),
       remainder=st.sampled_from(["pad", "drop", "keep"]), seeded=st.booleans(), data=st.data())
def test_cached_epoch_wastes_less_than_a_step_and_resumes_on_any_world_size(
        lengths: list[int], setting: int | str, world: int, batch: int, seq: int, pack: bool, remainder: str,
        seeded: bool, data: st.DataObject) -> None:
    assume(setting == "auto" or int(setting) <= len(lengths))
    virtual = virtual_ranks(setting, len(lengths))
    store = fake_store(lengths, per_shard=data.draw(st.integers(1, 16)))
    layout = layout_of(store, virtual, seed=3 if seeded else None, pack=pack)
    rows, _ = run(store, layout, world, batch, seq, pack, remainder)

    step = world * batch * (seq if pack else 1)  # one global step, in tokens or samples
    epoch = Counter(t for ids in store.ids for t in ids.tolist()) if pack else Counter(range(len(lengths)))
    got = units(store, rows, pack)
    repeated, lost = sum((got - epoch).values()), sum((epoch - got).values())
    if remainder == "keep":
        assert got == epoch
    elif remainder == "pad":
        assert lost == 0 and repeated < step, (repeated, step)
    else:
        assert repeated == 0 and lost < step, (lost, step)
    window = world * batch
    everything = len(run(store, layout, 1, 1 << 20, seq, pack, "keep")[0])  # the epoch's rows, in one batch
    assert remainder == "keep" or len(rows) % window == 0  # whole steps: every rank the same full batches
    assert abs(len(rows) - everything) < window  # fewer than a step's rows repeated (pad) or skipped (drop)

    others = [w for w in range(1, 9) if window % w == 0 and w != world] or [world]
    alone, _ = run(store, layout, 1, window, seq, pack, remainder)  # the same global batches on one rank
    assert alone == rows
    stop = data.draw(st.integers(0, -(-len(rows) // window)))
    before, position = run(store, layout, world, batch, seq, pack, remainder, steps=stop)
    other = data.draw(st.sampled_from(others))
    after, _ = run(store, layout, other, window // other, seq, pack, remainder, start=position)
    assert position == stop * window and not set(before) & set(after) and {**before, **after} == rows


def streaming_dataset(root: Path, gens: list[int], runtime: Runtime, *, pack: bool, remainder: str) -> ServedDataset:
    """One source of pairs whose completions have these word counts (min_length 1: tiny samples pass)."""
    records = [{"prompt": f"fn f{i}()", "gen": " ".join(["x"] * n), "_source": "s", "_split": "train",
                "_task_type": "completion"} for i, n in enumerate(gens)]
    raw = {"model_name": str(TOKENIZER_DIR), "max_seq_len": SEQ, "pack": pack,
           "dataset": {"names": [f"local:{write_jsonl(root / 'pairs.jsonl', records)}"], "use_cache": False,
                       "shuffle_seed": 5, "shuffle_block": 7, "remainder": remainder, "min_length": 1}}
    return ServedDataset(parse_config(raw, "test.yaml", root).datasets["default"], "test.yaml", encoder(),
                         runtime=runtime)


def real(rows: dict[int, Any], pack: bool) -> int:
    """Real tokens (packed) or rows (padded, one sample each) of delivered rows (test_global_rows.rows_of)."""
    return sum(sum(row[1]) for row in rows.values()) if pack else len(rows)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gens=st.builds(heavy_tailed, count=st.integers(1, 40), seed=st.integers(0, 1 << 16),
                      shape=st.sampled_from(["lognormal", "pareto"]), spread=st.floats(0.5, 2.0),
                      longest=st.just(60)),
       world=st.integers(1, 8), batch=st.integers(1, 3), pack=st.booleans(), data=st.data())
def test_streaming_epoch_wastes_less_than_a_step_and_resumes_on_any_world_size(
        runtime: Runtime, gens: list[int], world: int, batch: int, pack: bool, data: st.DataObject) -> None:
    with TemporaryDirectory() as tmp:
        served = {}
        for remainder in ("keep", "pad", "drop"):
            dataset = streaming_dataset(Path(tmp) / remainder, gens, runtime, pack=pack, remainder=remainder)
            served[remainder], _, _ = run_streaming(dataset, world, batch)
            assert run_streaming(dataset, 1, world * batch)[0] == served[remainder]  # one global batch sequence
        epoch = real(served["keep"], pack)
        step = world * batch * (SEQ if pack else 1)
        assert all(abs(len(served[r]) - len(served["keep"])) < world * batch for r in ("pad", "drop"))  # rows
        assert epoch <= real(served["pad"], pack) < epoch + step
        assert epoch - step < real(served["drop"], pack) <= epoch
        stop = data.draw(st.integers(0, -(-len(served["drop"]) // (world * batch))))
        before, _, packers = run_streaming(dataset, world, batch, steps=stop)  # the `drop` dataset
        after, _, _ = run_streaming(dataset, 1, world * batch, state=packers[-1].get_state())
        assert not set(before) & set(after) and {**before, **after} == served["drop"]
