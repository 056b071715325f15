"""Lightning: a DataModule that saves every rank's feed position in checkpoints and restores it on resume.

    trainer.fit(model, datamodule=FeedDataModule(FeedDataset(target, batch_size=16)), ckpt_path=...)

Lightning fetches the next batch before it trains the current one, so the feed's own state_dict() is a
batch ahead when a checkpoint is written; the DataModule saves the position carried by the last batch
that reached training (on_before_batch_transfer) instead. Checkpoints hold every rank's position (only
rank 0 writes the file); each rank restores its own.

Packed rows: at the first training batch (the model set up and on its device, on every rank) the DataModule
turns off `use_cache` in every config of the LightningModule (transformers models build a KV cache in training
otherwise, and their packed samples attend to each other) and runs check_packed_attention's probe on each model
in it that takes `input_ids` and `position_ids`; a model that fails it stops training with PackedAttentionError,
and a LightningModule holding no such model gets a PackedAttentionWarning.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from ..attention import PackedAttentionWarning, check_packed_attention, disable_kv_cache, packed_models
from ..dataset import FeedDataset
from ..position import FeedState, batch_state
from .ranks import gather_states, load_own_state


class FeedDataModule(pl.LightningDataModule):
    """Train batches from a FeedDataset, as they come; the position of the last batch trained in checkpoints."""

    def __init__(self, feed: FeedDataset, pin_memory: bool = False, check_attention: bool = True) -> None:
        """check_attention=False skips the probe of the model at the first packed batch (use_cache is turned off
        either way): for a model in low precision that fails it only by rounding, or one checked already."""
        super().__init__()
        self.feed, self.pin_memory, self.check_attention = feed, pin_memory, check_attention
        self._trained: FeedState | None = None
        self._attention_done = False
        feed.secure_packed_attention(type(self).__name__)

    def train_dataloader(self) -> DataLoader:
        """The ready batches: no sampler, no collator, no workers."""
        return DataLoader(self.feed, batch_size=None, pin_memory=self.pin_memory)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Remember the position after the batch about to be trained on."""
        if self.trainer is not None and self.trainer.training:
            self._trained = batch_state(batch)
            if not self._attention_done:
                self._secure_attention(batch)
        return batch

    def _secure_attention(self, batch: Any) -> None:
        """Before the first packed step: no KV cache in any model of the LightningModule, and each model that
        takes the batch checked (a collective under sharding strategies: every rank runs it at its first batch)."""
        self._attention_done = True
        if "position_ids" not in batch:  # padded rows: nothing to keep apart
            return
        assert self.trainer is not None
        module = self.trainer.lightning_module
        disable_kv_cache(module)
        models = packed_models(module)
        if not models:
            warnings.warn(
                f"FeedDataModule: {type(module).__name__} holds no model whose forward takes input_ids and "
                "position_ids, so sigil-feed cannot check that packed samples do not attend to each other: make "
                "sure your model derives a per-segment mask from position_ids, and call "
                "sigil_feed.client.check_packed_attention on the module that takes the batch if you can",
                PackedAttentionWarning, stacklevel=2)
        elif self.check_attention:
            for model in models:
                check_packed_attention(model)

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position after its last batch trained (a collective: Lightning calls it on all ranks)."""
        return gather_states(self._trained or self.feed.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume this rank's stream right after the last batch it trained on."""
        load_own_state(self.feed, state_dict)
        self._trained = None
