"""Hugging Face Trainer on a FeedDataset: ready batches in, every rank's feed position in every checkpoint.

    trainer = FeedTrainer(model=model, args=TrainingArguments("out", max_steps=10_000, save_steps=500),
                          train_dataset=FeedDataset(target, batch_size=16))
    trainer.train(resume_from_checkpoint=True)

How the Trainer is fitted to a stream of ready batches:
- get_train_dataloader returns DataLoader(feed, batch_size=None): the stock one re-batches through a
  collator and passes the loader through accelerator.prepare, which re-shards an already sharded stream
  (or lets rank 0 read for everyone) and reads ahead. The Trainer still moves each batch to its device.
- The dataset has no length, so TrainingArguments needs max_steps.
- Each rank writes the position after the last batch it trained on into checkpoint-N *before* the
  Trainer writes the checkpoint (trainer_state.json last), and resume_from_checkpoint=True takes the
  newest checkpoint that holds trainer_state.json and the position of every rank that saved it. A run on
  another number of ranks resumes from it too (integrations.ranks.resume_state). ignore_data_skip=True
  stops the Trainer from fast-forwarding a stream that already resumes at the right batch.
- Packed rows: the Trainer sets config.use_cache from TrainingArguments.use_cache (False by default) and TRL
  passes use_cache=False; train() turns it off in every config of the model anyway, since with a KV cache
  transformers derives no per-segment mask from position_ids and packed samples attend to each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from ..attention import disable_kv_cache
from ..dataset import FeedDataset
from ..position import FeedState, batch_state
from .ranks import resume_state

TRAINER_STATE = "trainer_state.json"
"""The file the Trainer writes last into a checkpoint."""


def feed_state_file(rank: int) -> str:
    """The file in a checkpoint folder that holds one rank's feed position."""
    return f"sigil_feed_rank{rank}.pt"


def saved_world(folder: Path) -> int | None:
    """How many ranks wrote the checkpoint, from rank 0's feed position (None without it)."""
    first = folder / feed_state_file(0)
    return int(torch.load(first).get("world_size", 1)) if first.is_file() else None


def saved_states(folder: Path) -> list[FeedState | None]:
    """The feed positions a checkpoint holds, by rank (None where one is missing); empty without rank 0's."""
    paths = [folder / feed_state_file(rank) for rank in range(saved_world(folder) or 0)]
    return [torch.load(path) if path.is_file() else None for path in paths]


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders holding the Trainer's state and the feed position of every rank that saved them,
    newest first (only rank 0's position is read; the others' files need only be there)."""
    folders = [p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in folders if (p / TRAINER_STATE).is_file() and (world := saved_world(p))
                   and all((p / feed_state_file(rank)).is_file() for rank in range(world))),
                  key=lambda p: int(p.name.split("-")[-1]), reverse=True)


class FeedTrainerMixin:
    """What makes a Trainer (or a subclass such as TRL's) train on a FeedDataset; mix in before it."""

    feed: FeedDataset
    _trained: FeedState | None

    def _use_feed(self, feed: FeedDataset) -> None:
        """Adopt `feed` as the training data (call after the Trainer's __init__)."""
        self.feed, self._trained = feed, None
        self.args.ignore_data_skip = True  # type: ignore[attr-defined]
        feed.secure_packed_attention(type(self).__name__)

    def get_train_dataloader(self) -> DataLoader:
        """The batches as they come: no sampler, no collator, no accelerator.prepare."""
        pin = self.args.dataloader_pin_memory and torch.cuda.is_available()  # type: ignore[attr-defined]
        return DataLoader(self.feed, batch_size=None, pin_memory=pin)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Remember the position after this batch, then train on it as usual."""
        self._trained = batch_state(inputs)
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write this rank's position into checkpoint-N first, then let the Trainer complete the folder."""
        run_dir = Path(self._get_output_dir(trial=trial))  # type: ignore[attr-defined]
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # type: ignore[attr-defined]
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self._trained or self.feed.state_dict(), folder / feed_state_file(self.feed.ranks()[0]))
        super()._save_checkpoint(model, trial)  # type: ignore[misc]

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> TrainOutput:
        """Train; when resuming, first restore this rank's feed position saved with the checkpoint."""
        disable_kv_cache(self.model)  # type: ignore[attr-defined]
        if resume_from_checkpoint:
            folder = self._resume_folder(resume_from_checkpoint)
            self.feed.load_state_dict(resume_state(saved_states(folder), *self.feed.ranks()))
            resume_from_checkpoint = str(folder)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)  # type: ignore[misc]

    def _resume_folder(self, resume_from_checkpoint: str | bool) -> Path:
        """The checkpoint to resume: the one given, or the newest complete one in output_dir."""
        if resume_from_checkpoint is True:
            output_dir = Path(str(self.args.output_dir))  # type: ignore[attr-defined]
            found = complete_checkpoints(output_dir) if output_dir.is_dir() else []
            if not found:
                raise ValueError(f"no checkpoint in {output_dir} holds {TRAINER_STATE} and the sigil-feed "
                                 "position of every rank that saved it: nothing to resume from")
            return found[0]
        folder = Path(str(resume_from_checkpoint))
        if folder not in complete_checkpoints(folder.parent):
            raise FileNotFoundError(f"{folder} lacks {TRAINER_STATE} or a sigil-feed position "
                                    f"({feed_state_file(0)} ...): it was not written completely by FeedTrainer")
        return folder


class FeedTrainer(FeedTrainerMixin, Trainer):
    """A transformers Trainer whose train_dataset is a FeedDataset."""

    def __init__(self, *, train_dataset: FeedDataset, **kwargs: Any) -> None:
        super().__init__(train_dataset=train_dataset, **kwargs)
        self._use_feed(train_dataset)
