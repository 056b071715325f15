"""Every rank's feed state in one checkpoint written by one process, and the state each rank of a (possibly
different) world size resumes from."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..dataset import FeedDataset
from ..position import FeedState


def gather_states(state: FeedState) -> dict[str, Any]:
    """{"ranks": [state of rank 0, rank 1, ...]} (a collective: every rank must call it)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        # Wait (without the GIL) until gloo's worker has dropped the gather's tensors: a Python-owned tensor it
        # releases after the main thread has reached interpreter exit deadlocks the process there (the worker
        # waits for the GIL that the exiting DDP reducer holds while it joins the worker).
        dist.barrier()
        return {"ranks": states}
    return {"ranks": [state]}


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
