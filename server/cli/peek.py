"""`sigil-feed peek`: stream a few batches from a running server and decode them back to text."""

from __future__ import annotations

import argparse

from ...client.stream import BatchStream, FeedBatch
from ..errors import ConfigError
from ..pipeline.tokenize import load_tokenizer
from .query import credentials, metadata


def peek(args: argparse.Namespace) -> int:
    """Print the first batches of a dataset, each row decoded with the dataset's tokenizer when it loads here."""
    with BatchStream(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len,
                     prefetch=2, reconnect_deadline_s=5.0, credentials=credentials(args),
                     metadata=metadata(args)) as stream:
        info = stream.info
        try:
            tokenizer = load_tokenizer(info.tokenizer)
        except ConfigError:
            tokenizer = None
        print(f"dataset={info.name} tokenizer={info.tokenizer} vocab={info.vocab_size} "
              f"seq_len={stream.seq_len} pack={info.pack}")
        batches = (item for item in stream if isinstance(item, FeedBatch))
        for _, batch in zip(range(args.n), batches, strict=False):
            ids = batch.arrays["input_ids"]
            print(f"--- batch {batch.seq} epoch {batch.epoch} shape {list(ids.shape)} tokens {batch.tokens} "
                  f"cursor {len(batch.cursor)} bytes")
            for row, row_ids in enumerate(ids):
                text = tokenizer.decode(row_ids.tolist()) if tokenizer else str(row_ids.tolist())
                print(f"[row {row}] {text[: args.chars]!r}")
    return 0
