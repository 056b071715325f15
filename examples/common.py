"""What the examples share and is not about sigil-feed: command line, a tiny model, and machine-readable output."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sigil_feed.protos import feed_pb2


def arg_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every example takes; an example adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--target", default="127.0.0.1:50051", help="the sidecar, HOST:PORT")
    parser.add_argument("--dataset", default="default", help="a dataset the server's config defines")
    parser.add_argument("--steps", type=int, default=50, help="train until this optimizer step")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per batch, per rank")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dump", type=Path, help="folder to write each rank's per-step row hashes to")
    return parser


def save_due(args: argparse.Namespace, steps_done: int) -> bool:
    """Whether a loop saves after this many steps: at --steps, and every --save-steps if given."""
    return steps_done == args.steps or (bool(args.save_steps) and steps_done % args.save_steps == 0)


def tiny_causal_lm(info: feed_pb2.DatasetInfo, seq_len: int) -> torch.nn.Module:
    """A randomly initialised 2-layer GPT-2 sized to the dataset's tokenizer; trains on a CPU in seconds.

    Its config keeps GPT-2's use_cache=True, as a real checkpoint's does: with it, transformers builds a KV cache
    in training too and derives no per-sample mask from position_ids, so packed samples would attend to each
    other. The loops call check_packed_attention(model) (it turns the cache off and checks the model); FeedTrainer,
    FeedSFTTrainer and FeedDataModule do it themselves. No dropout, so a resumed run reproduces an uninterrupted one.
    """
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=info.vocab_size, n_positions=seq_len, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=info.eos_id, eos_token_id=info.eos_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class BatchLog:
    """Appends, per training step, a hash of every row the step trained on to DIR/rank{rank}.jsonl."""

    def __init__(self, folder: Path | None, rank: int) -> None:
        self.path = None if folder is None else folder / f"rank{rank}.jsonl"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, input_ids: torch.Tensor) -> None:
        """Log the rows of one batch under the (0-based) step it was trained in."""
        if self.path is None:
            return
        rows = [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in input_ids.cpu().numpy()]
        with self.path.open("a") as out:
            out.write(json.dumps({"step": step, "rows": rows}) + "\n")


def report(losses: list[float], rank: int = 0) -> None:
    """Print the line the integration tests read: RESULT {"rank": ..., "losses": [...]}."""
    # one write of one line: ranks sharing a pipe (Lightning's DDP children) cannot interleave it
    sys.stdout.write("RESULT " + json.dumps({"rank": rank, "losses": losses}) + "\n")
    sys.stdout.flush()
