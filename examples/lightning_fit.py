"""Lightning on sigil-feed batches: FeedDataModule keeps every rank's stream position in the checkpoints.

    sigil-feed serve &
    python examples/lightning_fit.py --steps 40 --output-dir out
    python examples/lightning_fit.py --steps 60 --output-dir out --resume out/last.ckpt
    python examples/lightning_fit.py --steps 40 --devices 2        # strategy="ddp", one process per device

FeedDataModule (sigil_feed.client.integrations.lightning) saves the position of the last batch trained,
not the one Lightning has already fetched, so fit(ckpt_path=...) continues with exactly the next batch.
At the first batch it turns off use_cache and checks the model, so packed samples never attend to each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from common import BatchLog, arg_parser, report, tiny_causal_lm
from lightning.pytorch.callbacks import ModelCheckpoint

from sigil_feed.client import FeedDataset
from sigil_feed.client.integrations.lightning import FeedDataModule


class CausalLM(pl.LightningModule):
    """A tiny causal LM that logs each step's rows (--dump) and its loss."""

    def __init__(self, model: torch.nn.Module, lr: float, batch_log: BatchLog) -> None:
        super().__init__()
        self.model, self.lr, self.batch_log = model, lr, batch_log
        self.losses: list[float] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimizer step on a ready batch."""
        self.batch_log.record(self.global_step, batch["input_ids"])
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW, as in the other examples."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    """Train a tiny causal LM with Lightning for --steps steps, checkpointing every --save-steps."""
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("lightning-out"))
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; more than 1 runs DDP (gloo)")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint")
    args = parser.parse_args()

    feed = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    checkpoints = ModelCheckpoint(dirpath=args.output_dir, every_n_train_steps=args.save_steps, save_top_k=-1,
                                  save_last=True)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", callbacks=[checkpoints],
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    model = CausalLM(tiny_causal_lm(feed.fetch_info(), args.seq_len), args.lr,
                     BatchLog(args.dump, trainer.global_rank))
    trainer.fit(model, datamodule=FeedDataModule(feed), ckpt_path=args.resume)
    report(model.losses, trainer.global_rank)


if __name__ == "__main__":
    main()
