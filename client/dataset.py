"""FeedDataset: a torch IterableDataset over a BatchStream, with a resumable state_dict."""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator
from multiprocessing.context import get_spawning_popen
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from ..protos import feed_pb2
from .attention import SECURED_BY_CHECK, packed_attention_checked, warn_unchecked
from .decode import varlen_kwargs
from .position import FeedState, PositionedBatch, decode_cursor, encode_cursor
from .stream import BatchStream, FeedBatch, FeedError
from .wrappers import check_not_wrapped

log = logging.getLogger(__name__)

_SPAWN_DEPTH = 64
"""Frames between pickling for a spawned worker and the DataLoader (wrapper) that starts it, with room to spare."""

ModelInputs = dict[str, torch.Tensor | int]
"""What FeedDataset yields: named tensors, plus int max_length_q/k with flash_attn_kwargs."""


def default_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


RUN_ID_ENV = ("SIGIL_FEED_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")
"""Where a job's run id comes from when FeedDataset is given none, first set first (torchrun's `none`, its default
rendezvous id, does not count)."""


def default_run_id() -> str:
    """The job's run id from the launcher's environment (RUN_ID_ENV), "" if none: every rank and node of one job
    sees the same, so the job's sidecars agree on each epoch's files."""
    for name in RUN_ID_ENV:
        value = os.environ.get(name, "")
        if value and value != "none":
            return value
    return ""


class FeedDataset(IterableDataset[ModelInputs]):
    """Batches [B, L] from a sigil-feed server as dicts of torch tensors; use DataLoader(batch_size=None).

    Each batch is a PositionedBatch: `batch_state(batch)` is the state that resumes right after it, for
    loops that fetch ahead of training (Lightning, a DataLoader with workers). state_dict() is the state
    after the last batch yielded, for loops that do not.

    Packed rows need a model that keeps their segments apart: the first packed batch warns
    (attention.PackedAttentionWarning) unless check_packed_attention(model) ran in this process or an
    integration that ensures it (FeedTrainer, FeedSFTTrainer, FeedDataModule) adopted the feed.
    """

    def __init__(self, target: str, dataset: str = "default", *, batch_size: int, seq_len: int | None = None,
                 rank: int | None = None, world_size: int | None = None, prefetch: int = 4,
                 reconnect_deadline_s: float = 300.0, client_id: str | None = None, pin_memory: bool = False,
                 flash_attn_kwargs: bool = False, run_id: str | None = None, **stream_options: Any) -> None:
        """Remember the stream settings; nothing connects until iteration starts.

        run_id: the job's run, the same on every rank and node (None: `default_run_id()`, from SIGIL_FEED_RUN_ID,
        TORCHELASTIC_RUN_ID or SLURM_JOB_ID): the sidecars of a job that share a token store then serve the same
        files in each epoch when files are added during the run ("": each sidecar fixes them itself).
        pin_memory: yield page-locked tensors when CUDA is available (for `.to(device, non_blocking=True)`).
        flash_attn_kwargs: packed datasets only; add `cu_seq_lens_q/k` and `max_length_q/k` (see varlen_kwargs).
        stream_options go to BatchStream, e.g. connect_deadline_s, credentials, metadata, report_timing.
        """
        super().__init__()
        self.target, self.dataset, self.batch_size, self.seq_len = target, dataset, batch_size, seq_len
        self._rank, self._world_size = rank, world_size
        self.prefetch, self.reconnect_deadline_s = prefetch, reconnect_deadline_s
        self.client_id = client_id
        self.run_id = default_run_id() if run_id is None else run_id
        self.pin_memory, self.flash_attn_kwargs = pin_memory, flash_attn_kwargs
        self.stream_options = stream_options
        self.cursor = b""
        self.epoch: int | None = None
        self.row = 0  # the global row of `epoch` where the next step starts
        self.info: feed_pb2.DatasetInfo | None = None
        # one shared byte, set by DataLoader workers forked from this process when they iterate a copy
        self._worker_flag: mmap.mmap | None = mmap.mmap(-1, 1)
        self._sent_to_workers = False
        self._attention_secured_by: str | None = None

    def secure_packed_attention(self, by: str) -> None:
        """Record that `by` keeps packed segments apart in the model these batches train (the integrations call
        it); the feed then does not warn at its first packed batch."""
        self._attention_secured_by = by

    def ranks(self) -> tuple[int, int]:
        """(rank, world_size) of this stream: the trainer's rank, split further across DataLoader workers.

        Worker w of W inside rank r reads the stream of rank r*W + w of world_size*W, so workers never
        overlap; each worker's state_dict (as torchdata's StatefulDataLoader collects them) resumes it.
        """
        rank, world_size = self._trainer_ranks()
        worker = get_worker_info()
        if worker is not None and worker.num_workers > 1:
            return rank * worker.num_workers + worker.id, world_size * worker.num_workers
        return rank, world_size

    def _trainer_ranks(self) -> tuple[int, int]:
        """(rank, world_size) of the training process, before any split across DataLoader workers."""
        rank, world_size = default_rank_world()
        return (rank if self._rank is None else self._rank,
                world_size if self._world_size is None else self._world_size)

    def __iter__(self) -> Iterator[ModelInputs]:
        """Stream batches from right after the last one yielded (or the loaded state)."""
        check_not_wrapped()
        if get_worker_info() is not None and self._worker_flag is not None:
            self._worker_flag[0] = 1
        return self._batches()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the fork-shared flag; a copy pickled for a new process marks this one as shared.

        A copy pickled for a spawn or forkserver worker is checked and pinned here, in the process that starts
        the worker, because the worker cannot see that process: its stack (a forked worker inherits it, and
        __iter__ refuses an Accelerate-prepared loader there) and its torch.distributed rank (a spawned worker
        has no process group, and RANK/WORLD_SIZE need not be set, e.g. under mp.spawn launchers).
        """
        state = {**self.__dict__, "_worker_flag": None}
        if get_spawning_popen() is not None:
            check_not_wrapped(_SPAWN_DEPTH)
            self._sent_to_workers = True
            state["_rank"], state["_world_size"] = self._trainer_ranks()
            if packed_attention_checked():  # in this process, which the worker cannot see
                state["_attention_secured_by"] = self._attention_secured_by or SECURED_BY_CHECK
        return state

    def fetch_info(self) -> feed_pb2.DatasetInfo:
        """Connect briefly to learn the dataset's facts (vocab size, eos/pad ids, packing) before training."""
        with self._open(prefetch=1) as stream:
            self.info = stream.info
        return self.info

    def _open(self, prefetch: int) -> BatchStream:
        """A stream for this rank from the current cursor."""
        rank, world_size = self.ranks()
        return BatchStream(self.target, self.dataset, batch_size=self.batch_size, seq_len=self.seq_len or 0,
                           rank=rank, world_size=world_size, cursor=self.cursor, prefetch=prefetch,
                           client_id=self.client_id or f"rank{rank}-pid{os.getpid()}", run_id=self.run_id,
                           reconnect_deadline_s=self.reconnect_deadline_s, **self.stream_options)

    def _batches(self) -> Iterator[ModelInputs]:
        """Generator behind __iter__; its finally (via the with block) closes the stream.

        A `break` or an exception in the training loop drops the DataLoader's iterator, which closes
        this generator and with it the gRPC stream and its receiving thread.
        """
        pin = self.pin_memory and _can_pin()
        with self._open(self.prefetch) as stream:
            self.info = stream.info
            if self.flash_attn_kwargs and not stream.info.pack:
                raise ValueError(f"flash_attn_kwargs=True needs packed rows, but dataset {self.dataset!r} "
                                 f"at {self.target} is served with pack: false")
            if stream.info.pack and self._attention_secured_by is None:
                warn_unchecked(self.dataset, self.target)
            rank, world_size = self.ranks()
            for item in stream:
                if isinstance(item, FeedBatch):
                    self.cursor, self.epoch, self.row = item.cursor, item.epoch, item.row
                    yield self._to_torch(item.arrays, pin, self._state(rank, world_size))

    def _to_torch(self, arrays: dict[str, np.ndarray], pin: bool, state: FeedState) -> ModelInputs:
        """Wrap decoded arrays as tensors (no copy unless pinning), adding the varlen kwargs if asked."""
        if self.flash_attn_kwargs:
            arrays = {**arrays, **varlen_kwargs(arrays["position_ids"])}
        batch = PositionedBatch({name: _tensor(value, pin) if isinstance(value, np.ndarray) else value
                                 for name, value in arrays.items()})
        batch.feed_state = state
        return batch

    def _state(self, rank: int, world_size: int) -> FeedState:
        """The current position as a state dict (plain types: loads with torch.load(weights_only=True))."""
        return {"cursor": encode_cursor(self.cursor), "epoch": self.epoch, "row": self.row,
                "dataset": self.dataset, "rank": rank, "world_size": world_size}

    def state_dict(self) -> FeedState:
        """The position right after the last batch yielded in this process (or the loaded one).

        Raises FeedError when DataLoader workers iterated this dataset: the positions live in the workers
        (torchdata's StatefulDataLoader collects them).
        """
        if get_worker_info() is None and (self._sent_to_workers or (self._worker_flag is not None
                                                                    and self._worker_flag[0])):
            raise FeedError(
                "FeedDataset.state_dict(): DataLoader worker processes iterated this dataset, so its position "
                "is in the workers, not here. Use torchdata's StatefulDataLoader and save loader.state_dict(), "
                "or DataLoader(num_workers=0) (the sidecar already does the data work)")
        return self._state(*self.ranks())

    def load_state_dict(self, state: FeedState) -> None:
        """Make the next iteration resume with exactly the batch after the saved one.

        The position is global, so a state saved by any rank of any world size resumes this rank: after a
        checkpoint where every rank stopped after the same step (see integrations.ranks.resume_state, which
        checks that), every rank of a new layout loads the same state. The row length must not change."""
        self.cursor, self.epoch, self.row = decode_cursor(state["cursor"]), state.get("epoch"), state.get("row", 0)


def _can_pin() -> bool:
    """Whether pinning is possible here; logs why pin_memory=True does nothing otherwise."""
    if torch.cuda.is_available():
        return True
    log.warning("FeedDataset(pin_memory=True) has no effect: CUDA is not available, batches stay in "
                "ordinary CPU memory")
    return False


def _tensor(array: np.ndarray, pin: bool) -> torch.Tensor:
    """A tensor sharing the array's memory, or a page-locked copy of it."""
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if pin else tensor
