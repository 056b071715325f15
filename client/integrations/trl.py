"""TRL: SFTTrainer on a FeedDataset, padding-free (packed rows with position_ids, no attention mask).

    trainer = FeedSFTTrainer(model=model, args=SFTConfig("out", max_steps=10_000, save_steps=500),
                             train_dataset=FeedDataset(target, batch_size=16), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=True)

The batches come tokenized and packed, so TRL's dataset preparation and collator are skipped: the
batches reach the model as the feed sends them (position_ids restart at every packed sample; no
attention_mask, which would let packed samples attend to each other). Checkpoints and resume work as in
FeedTrainer (see integrations.hf_trainer).
"""

from __future__ import annotations

import copy
from typing import Any

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ..dataset import FeedDataset
from .hf_trainer import FeedTrainerMixin


class FeedSFTTrainer(FeedTrainerMixin, SFTTrainer):
    """TRL's SFTTrainer training on the batches of a FeedDataset."""

    def __init__(self, *, train_dataset: FeedDataset, args: SFTConfig, **kwargs: Any) -> None:
        args = copy.copy(args)
        args.padding_free, args.packing, args.max_length = True, False, None
        given = args.dataset_kwargs if isinstance(args.dataset_kwargs, dict) else {}  # parsed by SFTConfig
        args.dataset_kwargs = {**given, "skip_prepare_dataset": True}
        # SFTTrainer inspects a sample of a datasets.Dataset in __init__; the feed replaces it for training
        stand_in = Dataset.from_dict({"input_ids": [[0]], "labels": [[0]]})
        super().__init__(train_dataset=stand_in, args=args, **kwargs)
        self._use_feed(train_dataset)
