"""What the Trainer-based examples (hf_trainer.py, trl_sft.py) share and is not about sigil-feed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from common import BatchLog, arg_parser, report
from transformers import Trainer, TrainerState


def trainer_arg_parser(description: str) -> argparse.ArgumentParser:
    """The common options plus the Trainer's output folder, checkpoint interval and resume."""
    parser = arg_parser(description)
    parser.add_argument("--output-dir", type=Path, default=Path("trainer-out"))
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
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


def run(trainer: Trainer, args: argparse.Namespace, batch_log: BatchLog) -> None:
    """Train (resuming if asked), then print the losses on rank 0."""
    trainer.batch_log = batch_log  # type: ignore[attr-defined]
    trainer.train(resume_from_checkpoint=args.resume or None)
    if trainer.is_world_process_zero():
        report([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
