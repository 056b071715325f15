"""Every rank's feed state in one checkpoint written by one process, and each rank's share read back."""

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


def load_own_state(feed: FeedDataset, saved: dict[str, Any]) -> None:
    """Restore this rank's entry of a gather_states() dict into `feed`."""
    rank, world_size = feed.ranks()
    states = saved["ranks"]
    if len(states) != world_size:
        raise ValueError(f"the checkpoint holds the feed positions of {len(states)} rank(s), this run has "
                         f"{world_size}: a cursor only resumes the same rank and world size")
    feed.load_state_dict(states[rank])
