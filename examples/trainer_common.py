"""What the Trainer-based examples (hf_trainer.py, trl_sft.py) share and is not about sigil-feed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from common import BatchLog, arg_parser, report
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def trainer_arg_parser(description: str) -> argparse.ArgumentParser:
    """The common options plus the Trainer's output folder, checkpoint interval, resume and preemption."""
    parser = arg_parser(description)
    parser.add_argument("--output-dir", type=Path, default=Path("trainer-out"))
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--stop-at", type=int, help="save and stop at this step (simulates preemption)")
    return parser


class LoggedSteps:
    """Mixin for a Trainer: logs each step's rows (--dump), so a test can compare runs batch by batch."""

    batch_log: BatchLog
    state: TrainerState

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Log the rows, then train on them as usual."""
        self.batch_log.record(self.state.global_step, inputs["input_ids"])
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]


class StopAt(TrainerCallback):
    """Ends training right after saving a checkpoint at `step`, as a preempted job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        """Ask for a save and a stop at the chosen step."""
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def run(trainer: Trainer, args: argparse.Namespace, batch_log: BatchLog) -> None:
    """Train (resuming if asked, stopping at --stop-at), then print the losses on rank 0."""
    trainer.batch_log = batch_log  # type: ignore[attr-defined]
    if args.stop_at:
        trainer.add_callback(StopAt(args.stop_at))
    trainer.train(resume_from_checkpoint=args.resume or None)
    if trainer.is_world_process_zero():
        report([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
