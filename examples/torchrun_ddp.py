"""DistributedDataParallel under torchrun: every rank streams its own shard, picked up from torch.distributed.

    sigil-feed serve &
    torchrun --nproc-per-node 4 examples/torchrun_ddp.py --steps 20 --batch-size 6 --save ckpt.pt
    torchrun --nproc-per-node 3 examples/torchrun_ddp.py --steps 40 --batch-size 8 --resume ckpt.pt
    torchrun --nproc-per-node 4 examples/torchrun_ddp.py --steps 40 --save-steps 10 --save 'ckpt-{step}.pt'

FeedDataset reads rank and world size from the initialised process group (or RANK/WORLD_SIZE), and the
server gives each rank a disjoint share of every epoch, so there is no DistributedSampler. With several
pods, point each rank at its own pod's sidecar; the sidecars must serve the same config. The checkpoint
holds every rank's position (gather_states); a run on another number of ranks resumes from it, and with
the same rows per step (4 x 6 = 3 x 8 above) trains on exactly the global batches the first run would have.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from common import BatchLog, arg_parser, report, save_due, tiny_causal_lm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from sigil_feed.client import FeedDataset, check_packed_attention
from sigil_feed.client.integrations.ranks import gather_states, load_own_state


def main() -> None:
    """Train a tiny causal LM with DDP (gloo on CPU, NCCL on GPUs) for --steps steps."""
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--save", type=Path,
                        help="write a checkpoint here at the end ({step} becomes the step; rank 0 writes it)")
    parser.add_argument("--save-steps", type=int, help="with --save: also write one every this many steps")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint, on any number of ranks")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")

    ds = FeedDataset(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len)
    model = tiny_causal_lm(ds.fetch_info(), args.seq_len).to(device)
    check_packed_attention(model)  # on every rank, before wrapping: packed samples must not attend to each other
    model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start = 0
    if args.resume:
        checkpoint = torch.load(args.resume, map_location=device)
        model.module.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        load_own_state(ds, checkpoint["data"])  # this rank's position, whatever the world size that saved it
        start = checkpoint["step"]

    batch_log, losses = BatchLog(args.dump, rank), []
    loader = DataLoader(ds, batch_size=None, pin_memory=cuda)
    # zip asks range first: the loop never pulls a batch it will not train on (that would move the cursor)
    for step, batch in zip(range(start, args.steps), loader, strict=False):
        batch_log.record(step, batch["input_ids"])
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if args.save and save_due(args, step + 1):
            data = gather_states(ds.state_dict())  # a collective: every rank's position, for any world size later
            if rank == 0:
                torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(), "data": data,
                            "step": step + 1}, str(args.save).format(step=step + 1))
    report(losses, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
