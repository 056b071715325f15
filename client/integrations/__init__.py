"""Glue for training frameworks, one module each; a module imports its framework only when it is imported.

- hf_trainer: FeedTrainer, a transformers Trainer on a FeedDataset.
- trl: FeedSFTTrainer, TRL's SFTTrainer on a FeedDataset (padding-free).
- lightning: FeedDataModule, the feed position in Lightning checkpoints.
- accelerate: FeedCheckpoint, the feed position in Accelerator.save_state/load_state.
- ranks: every rank's position in one checkpoint, and the one each rank of a new world size resumes from.
- fault_tolerant: StepFeed, batches by training step; a replica that rejoins (torchft) takes its peers' position.
"""
