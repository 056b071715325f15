"""Hugging Face Trainer on sigil-feed batches: no collator, no tokenization, resumable from its checkpoints.

    sigil-feed serve &
    python examples/hf_trainer.py --steps 40 --output-dir out
    python examples/hf_trainer.py --steps 60 --output-dir out --resume   # from the last checkpoint in out/

How the Trainer is fitted to a stream of ready batches (FeedTrainer below):
- get_train_dataloader returns DataLoader(feed, batch_size=None). The stock one batches
  per_device_train_batch_size items through a collator (turning each [B, L] batch into [1, B, L]) and passes
  the loader through accelerator.prepare, which (1) reads one batch ahead, so the feed's state_dict() would be
  one batch past what the Trainer trained on when a checkpoint is written, and (2) under several processes
  either lets rank 0 read for everyone (dispatch_batches) or re-shards each rank's already sharded stream.
  The Trainer still moves each batch to its device (_prepare_inputs), so nothing else is lost.
- The dataset has no length, so TrainingArguments needs max_steps; the Trainer then runs one "epoch" of
  max_steps steps, and the feed's own epochs (marked by FeedDataset.epoch) pass through unnoticed.
- On every save, FeedStateCallback writes each rank's FeedDataset.state_dict() into the checkpoint folder;
  train(resume_from_checkpoint=...) loads it before the first batch. ignore_data_skip=True stops the Trainer
  from fast-forwarding a stream that already resumes at the right batch (it would drop that many batches).
- per_device_train_batch_size only labels the logs: the rows per step are FeedDataset's batch_size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from common import BatchLog, arg_parser, report, tiny_causal_lm
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from sigil_feed.client import FeedDataset


def feed_state_file(feed: FeedDataset) -> str:
    """The file in a checkpoint folder that holds one rank's stream position."""
    return f"sigil_feed_rank{feed.ranks()[0]}.pt"


class FeedStateCallback(TrainerCallback):
    """Writes FeedDataset.state_dict() into every checkpoint folder, one file per rank."""

    def __init__(self, feed: FeedDataset) -> None:
        self.feed = feed

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Runs on every rank right after the Trainer wrote checkpoint-<global_step>."""
        folder = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.feed.state_dict(), folder / feed_state_file(self.feed))


class FeedTrainer(Trainer):
    """A Trainer whose train_dataset is a FeedDataset: ready batches in, stream position in checkpoints."""

    def __init__(self, *, train_dataset: FeedDataset, **kwargs: Any) -> None:
        super().__init__(train_dataset=train_dataset, **kwargs)
        self.feed = train_dataset
        self.args.ignore_data_skip = True
        self.add_callback(FeedStateCallback(train_dataset))

    def get_train_dataloader(self) -> DataLoader:
        """The batches as they come: no sampler, no collator, no accelerator.prepare (see the module doc)."""
        return DataLoader(self.feed, batch_size=None,
                          pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available())

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> TrainOutput:
        """Train; when resuming, first restore the stream position saved with the checkpoint."""
        if resume_from_checkpoint:
            folder = (get_last_checkpoint(str(self.args.output_dir)) if resume_from_checkpoint is True
                      else resume_from_checkpoint)
            if folder is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
            state_file = Path(folder) / feed_state_file(self.feed)
            if not state_file.is_file():
                raise FileNotFoundError(f"{state_file} is missing: this checkpoint was not written with "
                                        "FeedStateCallback, so the stream position is unknown")
            self.feed.load_state_dict(torch.load(state_file))
            resume_from_checkpoint = folder
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)


class LoggedFeedTrainer(FeedTrainer):
    """FeedTrainer that also logs each step's rows (--dump), so a test can compare runs batch by batch."""

    def __init__(self, *, batch_log: BatchLog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_log = batch_log

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Log the rows, then train on them as usual."""
        self.batch_log.record(self.state.global_step, inputs["input_ids"])
        return super().training_step(model, inputs, num_items_in_batch)


class StopAt(TrainerCallback):
    """Ends training right after saving a checkpoint at `step`, as a preempted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """Ask for a save and a stop at the chosen step."""
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def main() -> None:
    """Train a tiny causal LM with the Trainer for --steps steps, checkpointing every --save-steps."""
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("trainer-out"))
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--stop-at", type=int, help="save and stop at this step (simulates preemption)")
    args = parser.parse_args()

    feed = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), max_steps=args.steps, save_steps=args.save_steps, logging_steps=1,
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size, report_to="none",
        disable_tqdm=True, seed=0)
    trainer = LoggedFeedTrainer(model=tiny_causal_lm(feed.fetch_info(), args.seq_len), args=training_args,
                                train_dataset=feed, batch_log=BatchLog(args.dump, feed.ranks()[0]),
                                callbacks=[StopAt(args.stop_at)] if args.stop_at else None)
    trainer.train(resume_from_checkpoint=args.resume or None)
    if trainer.is_world_process_zero():
        report([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])


if __name__ == "__main__":
    main()
