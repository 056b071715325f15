"""Every rank's feed state in one checkpoint written by one process, and the state each rank of a (possibly
different) world size resumes from."""

from __future__ import annotations

import itertools
import json
from typing import Any

import torch.distributed as dist

from ..dataset import FeedDataset
from ..position import FeedState


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


def resume_state(states: list[FeedState | None], rank: int, world_size: int) -> FeedState:
    """The state rank `rank` of `world_size` resumes from, given every saved rank's state (None: missing).

    The same world size: each rank its own state (exact even if ranks stopped on different steps). Another
    world size (elastic resume): positions are global, so every new rank resumes from the one position all
    old ranks share; this needs every old rank's state, all after the same step, else ValueError saying
    which ranks are missing or where they stand.
    """
    saved_world = max([len(states)] + [s.get("world_size", 1) for s in states if s is not None])
    missing = [r for r in range(saved_world) if r >= len(states) or states[r] is None]
    if missing:
        raise ValueError(f"the checkpoint lacks the feed position of rank(s) {missing} of the {saved_world} that "
                         "saved it: a resume needs every rank's position (save with gather_states on every rank)")
    present = [s for s in states if s is not None]
    if saved_world == world_size:
        return present[rank]
    positions = {(s.get("epoch"), s.get("row")) for s in present}
    if len(positions) > 1:
        where = ", ".join(f"rank {r} at epoch {s.get('epoch')} row {s.get('row')}" for r, s in enumerate(present))
        raise ValueError(f"the {saved_world} saved ranks stopped at different positions ({where}): resuming on "
                         f"{world_size} ranks needs a checkpoint where every rank stopped after the same step; "
                         f"resume on {saved_world} ranks instead (each continues its own position)")
    return present[0]


def load_own_state(feed: FeedDataset, saved: dict[str, Any]) -> None:
    """Restore into `feed` the state this rank resumes from, out of a gather_states() dict."""
    feed.load_state_dict(resume_state(saved["ranks"], *feed.ranks()))
