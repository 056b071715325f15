"""MosaicML Streaming as a peer (runs in its own virtual environment, as a script: no sigil-feed imports).

Writes the pre-tokenized token stream as local MDS shards of fixed-length rows (llm-foundry's
`concat_tokens` layout: one `bytes` column of seq_len int32 ids per sample), then reads them back with
StreamingDataset and a DataLoader with 2 workers into [batch, seq_len] int64 tensors, epoch after epoch.
Prints one JSON line: tokens/s delivered after a warm-up, and the shard-writing time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any


def _import_streaming() -> Any:
    here = Path(__file__).resolve().parent  # keep bench/'s modules (common, plot, ...) off the import path
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    # streaming/__init__ imports its vision helpers, which need a torchvision built for the installed torch;
    # there is no CPU torchvision for torch 2.13 on PyPI, and text data needs none of it.
    sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming

    return streaming


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=Path, required=True, help=".npy of the flat int32 token stream")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1, help="measurement windows; the best is reported")
    args = parser.parse_args()
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    streaming = _import_streaming()
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # a killed earlier run may have left its shared memory behind
    torch.set_num_threads(1)
    tokens = np.load(args.tokens).astype(np.int32)
    rows = tokens[: len(tokens) // args.seq * args.seq].reshape(-1, args.seq)
    shutil.rmtree(args.out, ignore_errors=True)
    t0 = time.perf_counter()
    with streaming.MDSWriter(out=str(args.out), columns={"tokens": "bytes"}, size_limit="64mb") as writer:
        for row in rows:
            writer.write({"tokens": row.tobytes()})
    write_s = time.perf_counter() - t0

    class TokenRows(streaming.StreamingDataset):  # type: ignore[misc, name-defined]
        def __getitem__(self, index: int) -> torch.Tensor:
            raw = super().__getitem__(index)["tokens"]
            return torch.from_numpy(np.frombuffer(raw, dtype=np.int32).astype(np.int64))

    dataset = TokenRows(local=str(args.out), batch_size=args.batch, shuffle=True, shuffle_seed=0)
    loader: DataLoader[torch.Tensor] = DataLoader(dataset, batch_size=args.batch, num_workers=args.workers,
                                                  prefetch_factor=4, drop_last=True, persistent_workers=True)
    batches = _forever(loader)
    opened = time.perf_counter()
    next(batches)
    first_batch_s = time.perf_counter() - opened
    for _ in range(args.warmup):
        next(batches)
    windows = []
    for _ in range(args.reps):  # back-to-back windows; the best one is kept (a busy machine only slows)
        delivered, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            delivered += next(batches).numel()
        windows.append(delivered / (time.perf_counter() - start))
    print(json.dumps({"write_s": write_s, "rows": len(rows), "tokens_per_s": max(windows), "windows": windows,
                      "first_batch_s": first_batch_s, "version": streaming.__version__}), flush=True)


def _forever(loader: Any) -> Any:
    """Batches epoch after epoch."""
    while True:
        yield from loader


if __name__ == "__main__":
    main()
