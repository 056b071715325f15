"""Lightning: a DataModule that saves every rank's feed position in checkpoints and restores it on resume.

    trainer.fit(model, datamodule=FeedDataModule(FeedDataset(target, batch_size=16)), ckpt_path=...)

Lightning fetches the next batch before it trains the current one, so the feed's own state_dict() is a
batch ahead when a checkpoint is written; the DataModule saves the position carried by the last batch
that reached training (on_before_batch_transfer) instead. Checkpoints hold every rank's position (only
rank 0 writes the file); each rank restores its own.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from ..dataset import FeedDataset
from ..position import FeedState, batch_state
from .ranks import gather_states, load_own_state


class FeedDataModule(pl.LightningDataModule):
    """Train batches from a FeedDataset, as they come; the position of the last batch trained in checkpoints."""

    def __init__(self, feed: FeedDataset, pin_memory: bool = False) -> None:
        super().__init__()
        self.feed, self.pin_memory = feed, pin_memory
        self._trained: FeedState | None = None

    def train_dataloader(self) -> DataLoader:
        """The ready batches: no sampler, no collator, no workers."""
        return DataLoader(self.feed, batch_size=None, pin_memory=self.pin_memory)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Remember the position after the batch about to be trained on."""
        if self.trainer is not None and self.trainer.training:
            self._trained = batch_state(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position after its last batch trained (a collective: Lightning calls it on all ranks)."""
        return gather_states(self._trained or self.feed.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume this rank's stream right after the last batch it trained on."""
        load_own_state(self.feed, state_dict)
        self._trained = None
