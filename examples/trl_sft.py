"""TRL's SFTTrainer on sigil-feed batches: padding-free packed rows, no dataset preparation, exact resume.

    sigil-feed serve &
    python examples/trl_sft.py --steps 40 --output-dir out
    python examples/trl_sft.py --steps 60 --output-dir out --resume   # from the last checkpoint in out/

FeedSFTTrainer (sigil_feed.client.integrations.trl) takes the FeedDataset as train_dataset and trains on
its batches as they come: position_ids restart at every packed sample and no attention_mask is added.
The tokenizer is the sidecar's (the path the server reports); use your own in a real job.
"""

from __future__ import annotations

from common import BatchLog, tiny_causal_lm
from trainer_common import LoggedSteps, run, trainer_arg_parser
from transformers import AutoTokenizer
from trl import SFTConfig

from sigil_feed.client import FeedDataset
from sigil_feed.client.integrations.trl import FeedSFTTrainer


class LoggedSFTTrainer(LoggedSteps, FeedSFTTrainer):
    """FeedSFTTrainer that logs each step's rows (--dump)."""


def main() -> None:
    """Fine-tune a tiny causal LM with SFTTrainer for --steps steps, checkpointing every --save-steps."""
    args = trainer_arg_parser(__doc__.splitlines()[0]).parse_args()
    feed = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    info = feed.fetch_info()
    config = SFTConfig(
        output_dir=str(args.output_dir), max_steps=args.steps, save_steps=args.save_steps, logging_steps=1,
        learning_rate=args.lr, report_to="none", disable_tqdm=True, seed=0, bf16=False,
        activation_checkpointing=False)
    trainer = LoggedSFTTrainer(model=tiny_causal_lm(info, args.seq_len), args=config, train_dataset=feed,
                               processing_class=AutoTokenizer.from_pretrained(info.tokenizer))
    run(trainer, args, BatchLog(args.dump, feed.ranks()[0]))


if __name__ == "__main__":
    main()
