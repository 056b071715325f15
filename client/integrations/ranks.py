"""Every rank's feed state in one checkpoint written by one process, and the state each rank of a (possibly
different) world size resumes from."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

from ..dataset import FeedDataset
from ..position import CursorPosition, FeedState, cursor_position


def gather_states(state: FeedState) -> dict[str, Any]:
    """{"ranks": [state of rank 0, rank 1, ...]} (a collective: every rank must call it, as often as the others)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return {"ranks": _exchange(state)}
    return {"ranks": [state]}


_EXCHANGES = itertools.count()
"""Numbers each gather: every rank calls gather_states as often as the others, so they agree on the keys."""


def _exchange(state: FeedState) -> list[Any]:
    """Every rank's state (plain JSON types), through the process group's key-value store rather than a gloo
    collective: a gloo allgather's tensors can be freed by gloo's worker thread only after the main thread has
    reached interpreter exit, which deadlocks DDP's teardown (seen in about 1 of 20 torchrun runs on 2 busy
    cores, even with a barrier after the gather)."""
    store = dist.distributed_c10d._get_default_store()
    prefix = f"sigil_feed/feed_states/{next(_EXCHANGES)}"
    store.set(f"{prefix}/{dist.get_rank()}", json.dumps(state))
    return [json.loads(store.get(f"{prefix}/{rank}")) for rank in range(dist.get_world_size())]


def resume_state(states: Sequence[FeedState | None], rank: int, world_size: int) -> FeedState:
    """The state rank `rank` of `world_size` resumes from, given every saved rank's state (None: missing).

    The same world size: each rank its own state (exact even if ranks stopped on different steps). Another
    world size (elastic resume): positions are global, so every new rank resumes from the one position all
    old ranks share; this needs every old rank's state, all after the same step.

    What is trusted is what each cursor says (read from its bytes), not the metadata beside it: every state must
    be the one its place names (its `rank`), agree with its own cursor (`epoch`, `row`) and with the others on
    the world size and dataset. Anything else (no states, a missing or misplaced rank, ranks at different
    positions on a change of size, a cursor that is unreadable or contradicts its state) is a ValueError
    saying what is wrong.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"cannot resume rank {rank} of a world of {world_size}")
    if not states:
        raise ValueError("the checkpoint holds no feed position (no rank's state): nothing to resume from; save "
                         "with gather_states on every rank (the integrations do)")
    present = {index: state for index, state in enumerate(states) if state is not None}
    positions = {index: _checked_position(index, state) for index, state in present.items()}
    saved_world = _saved_world(states, present)
    missing = [r for r in range(saved_world) if r not in present]
    if missing:
        raise ValueError(f"the checkpoint lacks the feed position of rank(s) {missing} of the {saved_world} that "
                         "saved it: a resume needs every rank's position (save with gather_states on every rank)")
    datasets = {state.get("dataset") for state in present.values()}
    if len(datasets) > 1:
        raise ValueError(f"the saved ranks' states are of different datasets ({sorted(map(str, datasets))}): they "
                         "are not one checkpoint")
    if saved_world == world_size:
        return present[rank]
    if len({(p.fingerprint, p.epoch, p.seq_len, p.row) for p in positions.values()}) > 1:
        where = ", ".join(f"rank {r} at epoch {p.epoch} row {p.row}" for r, p in positions.items())
        raise ValueError(f"the {saved_world} saved ranks stopped at different positions ({where}): resuming on "
                         f"{world_size} ranks needs a checkpoint where every rank stopped after the same step; "
                         f"resume on {saved_world} ranks instead (each continues its own position)")
    return present[0]


def _checked_position(index: int, state: Any) -> CursorPosition:
    """The position of the state saved at `index`, after checking it is that rank's and agrees with its cursor."""
    if not isinstance(state, dict) or "cursor" not in state:
        raise ValueError(f"the checkpoint's entry for rank {index} is not a sigil-feed state (a dict with a "
                         f"cursor): {type(state).__name__}")
    if state.get("rank", index) != index:
        raise ValueError(f"the checkpoint's entry for rank {index} is the state of rank {state['rank']}: the states "
                         "are out of order or mixed up, so no rank can tell which position is its own")
    try:
        position = cursor_position(state["cursor"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"rank {index}'s saved feed position cannot be read: {err}") from None
    said = (state.get("epoch"), state.get("row"))
    if (said[0] is not None and said[0] != position.epoch) or (said[1] is not None and said[1] != position.row):
        raise ValueError(f"rank {index}'s saved state says epoch {said[0]} row {said[1]}, but its cursor resumes at "
                         f"epoch {position.epoch} row {position.row}: the state was edited or assembled from "
                         "different saves; it cannot be trusted")
    return position


def _saved_world(states: Sequence[FeedState | None], present: dict[int, FeedState]) -> int:
    """How many ranks saved the checkpoint: the states' one world_size, and no fewer than the entries."""
    worlds = {state.get("world_size", 1) for state in present.values()}
    if not worlds:
        return len(states)
    if len(worlds) > 1 or not all(type(w) is int and w >= 1 for w in worlds):
        raise ValueError(f"the saved ranks' states name different world sizes ({sorted(map(str, worlds))}): they "
                         "are not one checkpoint")
    saved_world = worlds.pop()
    if len(states) > saved_world:
        raise ValueError(f"the checkpoint holds {len(states)} ranks' entries, but its states say {saved_world} "
                         "rank(s) saved it")
    return saved_world


def load_own_state(feed: FeedDataset, saved: dict[str, Any]) -> None:
    """Restore into `feed` the state this rank resumes from, out of a gather_states() dict."""
    feed.load_state_dict(resume_state(saved["ranks"], *feed.ranks()))
