"""A plain PyTorch loop on sigil-feed batches, with the stream position saved in the checkpoint dict.

    sigil-feed serve &                                   # the embedded default dataset on 127.0.0.1:50051
    python examples/plain_pytorch.py --steps 20 --save ckpt.pt
    python examples/plain_pytorch.py --steps 40 --resume ckpt.pt   # continues with exactly the next batch
    python examples/plain_pytorch.py --steps 40 --save-steps 10 --save 'ckpt-{step}.pt'   # ckpt-10.pt ... ckpt-40.pt

The batches arrive ready ([B, L] input_ids, labels, position_ids), so the DataLoader only wraps the
dataset: batch_size=None (no re-batching, no collator) and num_workers=0 (the sidecar does the data work).
check_packed_attention(model) once before training: packed samples must not attend to each other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from common import BatchLog, arg_parser, report, save_due, tiny_causal_lm
from torch.utils.data import DataLoader

from sigil_feed.client import FeedDataset, check_packed_attention


def main() -> None:
    """Train a tiny causal LM for --steps optimizer steps, optionally resuming and saving a checkpoint."""
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--save", type=Path, help="write a checkpoint here at the end ({step} becomes the step)")
    parser.add_argument("--save-steps", type=int, help="with --save: also write one every this many steps")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    ds = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    model = tiny_causal_lm(ds.fetch_info(), args.seq_len).to(device)
    check_packed_attention(model)  # use_cache off, and a packed probe batch: segments must not see each other
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = 0
    if args.resume:
        checkpoint = torch.load(args.resume)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        ds.load_state_dict(checkpoint["data"])
        start = checkpoint["step"]

    batch_log, losses = BatchLog(args.dump, rank=0), []
    loader = DataLoader(ds, batch_size=None, pin_memory=device.type == "cuda")
    # zip asks range first: the loop never pulls a batch it will not train on (that would move the cursor)
    for step, batch in zip(range(start, args.steps), loader, strict=False):
        batch_log.record(step, batch["input_ids"])
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if args.save and save_due(args, step + 1):  # ds.state_dict(): after this batch, not those in flight
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "data": ds.state_dict(), "step": step + 1}, str(args.save).format(step=step + 1))
    report(losses)


if __name__ == "__main__":
    main()
