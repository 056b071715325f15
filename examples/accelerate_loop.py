"""An Accelerate loop on sigil-feed batches; runs alone or under torchrun / `accelerate launch`.

    sigil-feed serve &
    python examples/accelerate_loop.py --steps 30
    torchrun --nproc-per-node 2 examples/accelerate_loop.py --steps 30

Prepare the model and optimizer, not the DataLoader: accelerator.prepare(loader) reads one batch ahead
(FeedDataset.state_dict() would then be a batch past the last one trained on) and, under several processes,
either lets rank 0 read for everyone (dispatch_batches) or re-shards streams the server already sharded.
For the same reason save each rank's FeedDataset.state_dict() yourself beside accelerator.save_state():
register_for_checkpointing writes only the main process's copy.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from common import BatchLog, arg_parser, report, tiny_causal_lm
from torch.utils.data import DataLoader

from sigil_feed.client import FeedDataset


def main() -> None:
    """Train a tiny causal LM with Accelerate for --steps steps."""
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    # cpu=True on a machine without CUDA, or Accelerate runs each torchrun process as a world of one
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    ds = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    model = tiny_causal_lm(ds.fetch_info(), args.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)

    batch_log, losses = BatchLog(args.dump, accelerator.process_index), []
    loader = DataLoader(ds, batch_size=None, pin_memory=accelerator.device.type == "cuda")
    for step, batch in zip(range(args.steps), loader, strict=False):
        batch_log.record(step, batch["input_ids"])
        batch = {name: tensor.to(accelerator.device, non_blocking=True) for name, tensor in batch.items()}
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    report(losses, accelerator.process_index)
    accelerator.end_training()


if __name__ == "__main__":
    main()
