"""An Accelerate loop on sigil-feed batches; runs alone or under torchrun / `accelerate launch`.

    sigil-feed serve &
    python examples/accelerate_loop.py --steps 30 --save-dir state
    python examples/accelerate_loop.py --steps 50 --resume state      # continues with exactly the next batch
    python examples/accelerate_loop.py --steps 50 --save-steps 10 --save-dir 'state-{step}'   # state-10 ... state-50
    torchrun --nproc-per-node 2 examples/accelerate_loop.py --steps 30

Prepare the model and optimizer, not the DataLoader: accelerator.prepare(loader) would let rank 0 read for
every rank (or re-shard a stream the server already shards) and read a batch ahead; FeedDataset raises if
it is iterated that way. FeedCheckpoint puts every rank's stream position into save_state() and restores
each rank's own in load_state() (register_for_checkpointing(feed) alone keeps only the main process's).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from common import BatchLog, arg_parser, report, save_due, tiny_causal_lm
from torch.utils.data import DataLoader

from sigil_feed.client import FeedDataset, check_packed_attention
from sigil_feed.client.integrations.accelerate import FeedCheckpoint


class Progress:
    """The optimizer steps taken, checkpointed with the rest."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        """The steps taken."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue counting from the saved steps."""
        self.step = state["step"]


def main() -> None:
    """Train a tiny causal LM with Accelerate until step --steps, optionally resuming and saving its state."""
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--save-dir", type=Path,
                        help="accelerator.save_state() here at the end ({step} becomes the step)")
    parser.add_argument("--save-steps", type=int, help="with --save-dir: also save every this many steps")
    parser.add_argument("--resume", type=Path, help="accelerator.load_state() from here first")
    args = parser.parse_args()
    # cpu=True on a machine without CUDA, or Accelerate runs each torchrun process as a world of one
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    ds = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    model = tiny_causal_lm(ds.fetch_info(), args.seq_len)
    check_packed_attention(model)  # before prepare: packed samples must not attend to each other
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(FeedCheckpoint(ds), progress)
    if args.resume:
        accelerator.load_state(str(args.resume))

    batch_log, losses = BatchLog(args.dump, accelerator.process_index), []
    loader = DataLoader(ds, batch_size=None, pin_memory=accelerator.device.type == "cuda")
    for step, batch in zip(range(progress.step, args.steps), loader, strict=False):
        batch_log.record(step, batch["input_ids"])
        batch = {name: tensor.to(accelerator.device, non_blocking=True) for name, tensor in batch.items()}
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.step = step + 1
        if args.save_dir and save_due(args, progress.step):
            accelerator.save_state(str(args.save_dir).format(step=progress.step))

    report(losses, accelerator.process_index)
    accelerator.end_training()


if __name__ == "__main__":
    main()
