"""DistributedDataParallel under torchrun: every rank streams its own shard, picked up from torch.distributed.

    sigil-feed serve &
    torchrun --nproc-per-node 2 examples/torchrun_ddp.py --steps 30

FeedDataset reads rank and world size from the initialised process group (or RANK/WORLD_SIZE), and the
server gives each rank a disjoint share of every epoch, so there is no DistributedSampler. With several
pods, point each rank at its own pod's sidecar; the sidecars must serve the same config.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import BatchLog, arg_parser, report, tiny_causal_lm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from sigil_feed.client import FeedDataset


def main() -> None:
    """Train a tiny causal LM with DDP (gloo on CPU, NCCL on GPUs) for --steps steps."""
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")

    ds = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    model = DistributedDataParallel(tiny_causal_lm(ds.fetch_info(), args.seq_len).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    batch_log, losses = BatchLog(args.dump, rank), []
    loader = DataLoader(ds, batch_size=None, pin_memory=cuda)
    for step, batch in zip(range(args.steps), loader, strict=False):
        batch_log.record(step, batch["input_ids"])
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    report(losses, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
