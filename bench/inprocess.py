"""The trainer's way today (run as a subprocess): a Hugging Face `datasets` iterable with filtering and
tokenization inside the training process, packed into the same [batch, seq_len] tensors FeedDataset yields.

Reports the CPU seconds this process spends (every thread, the tokenizer's included) per million tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

CODE_COLUMNS = ["content", "path", "size"]
PAIR_COLUMNS = ["prompt", "gen", "_source", "_split", "_task_type"]


def trainer_dataset(code: Path, pairs: Path, tokenizer: Any) -> Any:
    """load_dataset(streaming=True) -> filter -> text -> tokenize (+EOS), code files then pairs."""
    from datasets import concatenate_datasets, load_dataset

    from bench.texts import keep, trainer_filter

    rule = trainer_filter()
    eos = tokenizer.eos_token_id
    code_ds = load_dataset("json", data_files=str(code), split="train", streaming=True)
    code_ds = code_ds.filter(lambda r: keep("content", r.get("_split"), r["path"], r["content"], rule))
    code_ds = code_ds.map(lambda r: {"text": r["content"]}, remove_columns=CODE_COLUMNS)
    pair_ds = load_dataset("json", data_files=str(pairs), split="train", streaming=True)
    pair_ds = pair_ds.filter(lambda r: keep("pair", r["_split"], None, "", rule))
    pair_ds = pair_ds.map(lambda r: {"text": r["prompt"] + "\n\n" + r["gen"]}, remove_columns=PAIR_COLUMNS)

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*x, eos] for x in ids]}

    return concatenate_datasets([code_ds, pair_ds]).map(tokenize, batched=True, batch_size=256,
                                                         remove_columns=["text"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--code", type=Path, required=True)
    parser.add_argument("--pairs", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=0)
    args = parser.parse_args()
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from bench.common import emit
    from bench.packing import Packer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    t0, cpu0 = time.perf_counter(), time.process_time()
    packer = Packer(args.batch, args.seq)
    tokens = batches = 0
    for record in trainer_dataset(args.code, args.pairs, tokenizer):
        for batch in packer.add(np.asarray(record["input_ids"], dtype=np.int64)):
            tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
            tokens += tensors["input_ids"].numel()
            batches += 1
        if args.max_tokens and tokens >= args.max_tokens:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    emit({"batches": batches, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
          "cpu_s_per_mtok": cpu / tokens * 1e6 if tokens else None})


if __name__ == "__main__":
    main()
