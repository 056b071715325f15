"""Hugging Face Trainer on sigil-feed batches: no collator, no tokenization, resumable from its checkpoints.

    sigil-feed serve &
    python examples/hf_trainer.py --steps 40 --output-dir out
    python examples/hf_trainer.py --steps 60 --output-dir out --resume   # from the last checkpoint in out/

FeedTrainer (sigil_feed.client.integrations.hf_trainer) serves the ready batches as they come and writes
each rank's stream position into every checkpoint before the Trainer completes it; see its module doc.
per_device_train_batch_size only labels the logs: the rows per step are FeedDataset's batch_size.
"""

from __future__ import annotations

from common import BatchLog, tiny_causal_lm
from trainer_common import LoggedSteps, run, trainer_arg_parser
from transformers import TrainingArguments

from sigil_feed.client import FeedDataset
from sigil_feed.client.integrations.hf_trainer import FeedTrainer


class LoggedFeedTrainer(LoggedSteps, FeedTrainer):
    """FeedTrainer that logs each step's rows (--dump)."""


def main() -> None:
    """Train a tiny causal LM with the Trainer for --steps steps, checkpointing every --save-steps."""
    args = trainer_arg_parser(__doc__.splitlines()[0]).parse_args()
    feed = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir), max_steps=args.steps, save_steps=args.save_steps, logging_steps=1,
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size, report_to="none",
        disable_tqdm=True, seed=0)
    trainer = LoggedFeedTrainer(model=tiny_causal_lm(feed.fetch_info(), args.seq_len), args=training_args,
                                train_dataset=feed)
    run(trainer, args, BatchLog(args.dump, feed.ranks()[0]))


if __name__ == "__main__":
    main()
