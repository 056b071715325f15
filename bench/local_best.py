"""The best local alternative (run as a subprocess): `datasets` pre-tokenized with map(num_proc=2), then a
DataLoader with 2 workers building the same packed batches from the Arrow files.

Each worker reads its contiguous half of the tokenized dataset in Arrow slices (no per-token Python) and
packs it, epoch after epoch. Reports tokens/s delivered to the training process after a warm-up, and the
pre-tokenization time. With `--save-tokens` it also writes the flat token stream (for the MDS peer).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bench.packing import Packer

SLICE = 1024


def pretokenize(code: Path, pairs: Path, tokenizer: Any, num_proc: int) -> Any:
    """load_dataset -> filter -> text -> tokenize (+EOS), code files then pairs, with num_proc workers."""
    from datasets import concatenate_datasets, load_dataset

    from bench.inprocess import CODE_COLUMNS, PAIR_COLUMNS
    from bench.texts import keep, trainer_filter

    rule = trainer_filter()
    eos = tokenizer.eos_token_id
    code_ds = load_dataset("json", data_files=str(code), split="train")
    code_ds = code_ds.filter(lambda r: keep("content", None, r["path"], r["content"], rule), num_proc=num_proc)
    code_ds = code_ds.map(lambda r: {"text": r["content"]}, remove_columns=CODE_COLUMNS, num_proc=num_proc)
    pair_ds = load_dataset("json", data_files=str(pairs), split="train")
    pair_ds = pair_ds.filter(lambda r: keep("pair", r["_split"], None, "", rule), num_proc=num_proc)
    pair_ds = pair_ds.map(lambda r: {"text": r["prompt"] + "\n\n" + r["gen"]}, remove_columns=PAIR_COLUMNS,
                          num_proc=num_proc)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*x, eos] for x in ids]}

    return concatenate_datasets([code_ds, pair_ds]).map(tokenize, batched=True, batch_size=256,
                                                         remove_columns=["text"], num_proc=num_proc)


class PackedArrow(IterableDataset):
    """Packed [batch, seq_len] batches from a tokenized Arrow dataset, each DataLoader worker its half."""

    def __init__(self, dataset: Any, batch_size: int, seq_len: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.seq_len = dataset, batch_size, seq_len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        shard = self.dataset
        if worker is not None:
            shard = shard.shard(num_shards=worker.num_workers, index=worker.id, contiguous=True)
        shard = shard.with_format("arrow")
        packer = Packer(self.batch_size, self.seq_len)
        while True:  # epochs
            for start in range(0, len(shard), SLICE):
                column = shard[start:start + SLICE].column("input_ids").combine_chunks()
                values = column.flatten().to_numpy()
                offsets = column.offsets.to_numpy()
                for batch in packer.add_many(np.split(values, offsets[1:-1])):
                    yield {k: torch.from_numpy(v) for k, v in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--code", type=Path, required=True)
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1, help="measurement windows; the best is reported")
    parser.add_argument("--save-tokens", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from bench.common import emit

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.perf_counter()
    dataset = pretokenize(args.code, args.pairs, tokenizer, args.workers)
    prep_s = time.perf_counter() - t0
    if args.save_tokens is not None:
        column = dataset.with_format("arrow")[:].column("input_ids").combine_chunks()
        np.save(args.save_tokens, column.flatten().to_numpy().astype(np.int32))
    loader = DataLoader(PackedArrow(dataset, args.batch, args.seq), batch_size=None, num_workers=args.workers,
                        prefetch_factor=4)
    opened = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first_batch_s = time.perf_counter() - opened
    for _ in range(args.warmup):
        next(batches)
    windows = []
    for _ in range(args.reps):  # back-to-back windows; the best one is kept (a busy machine only slows)
        tokens, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            tokens += next(batches)["input_ids"].numel()
        windows.append(tokens / (time.perf_counter() - start))
    emit({"prep_s": prep_s, "samples": len(dataset), "tokens_per_s": max(windows), "windows": windows,
          "first_batch_s": first_batch_s})


if __name__ == "__main__":
    main()
