"""A served dataset: its config, tokenizer, fingerprint and counters, and the stage chain for one rank."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..protos import feed_pb2
from .config import DatasetConfig, DatasetSection
from .curate import CuratedSource, CurateRules
from .errors import ConfigError
from .filters import make_filter
from .mixing import Mixer
from .order import BlockShuffle
from .pack import Packer, TokenizedSamples
from .samples import Sample, plain_pair
from .sources import open_source
from .stats import SourceCounters, Throughput
from .tokenize import Encoded, Encoder

SAMPLE_SETTINGS = ("min_length", "max_length", "exclude_tests", "exclude_examples", "exclude_benches",
                   "prefer_idiomatic", "prefer_documented", "idiomatic_quality_ratio", "shuffle_seed",
                   "interleave_mode", "stopping_strategy", "dataset_weights", "task_weights", "splits",
                   "legacy_filters", "chat_template", "completion_only", "shuffle_block", "names")


class ServedDataset:
    """Everything the server knows about one dataset; opens a fresh stage chain per stream."""

    def __init__(self, config: DatasetConfig, config_file: str, encoder: Encoder | None = None) -> None:
        self.config, self.section = config, config.dataset
        self.name = config.name
        self.encoder = encoder or Encoder(config.tokenizer, base_dir=config.base_dir, file=config_file)
        self.specs = [s.name for s in self.section.names]
        probes = [self._open(i) for i in range(len(self.specs))]  # fails fast on missing sources
        self.weights = _source_weights(self.section, self.specs, config_file)
        self.filter = make_filter(self.section)
        self.counters = [SourceCounters(spec) for spec in self.specs]
        self.throughput = Throughput()
        self.fingerprint = _fingerprint(self.section, [p.files for p in probes], self.encoder.fingerprint)

    def _open(self, index: int):  # type: ignore[no-untyped-def]
        return open_source(self.specs[index], index, base_dir=self.config.base_dir,
                           cache_dir=self.section.cache_dir)

    def info(self) -> feed_pb2.DatasetInfo:
        """The dataset's facts, as sent to clients."""
        return feed_pb2.DatasetInfo(
            name=self.name, tokenizer=self.config.tokenizer, vocab_size=self.encoder.vocab_size,
            eos_id=self.encoder.eos_id, pad_id=self.encoder.pad_id, max_seq_len=self.config.max_seq_len,
            pack=self.config.pack, completion_only=self.section.completion_only, mode="streaming",
            fingerprint=self.fingerprint, sources=self.specs)

    def packer(self, *, epoch: int, rank: int, world_size: int, batch_size: int, seq_len: int) -> Packer:
        """A fresh stage chain (sources -> curate -> mix -> order -> tokenize -> pack) for one rank's epoch."""
        section = self.section
        seed = section.shuffle_seed
        pair_format = self.encoder.chat_format if section.chat_template else plain_pair
        children = []
        for index, spec in enumerate(section.names):
            rules = CurateRules(filter=self.filter, filter_override=spec.filter,
                                splits=frozenset(section.splits), task_weights=section.task_weights,
                                seed=seed or 0, strict=section.on_bad_record == "fail",
                                pair_format=pair_format)
            children.append(CuratedSource(self._open(index), rules, self.counters[index]))
        mixer = Mixer(children, section.interleave_mode, section.stopping_strategy, self.weights, seed or 0)
        order = BlockShuffle(mixer, block_size=section.shuffle_block, seed=seed, epoch=epoch, rank=rank,
                             world_size=world_size)
        record = self._record_lengths if epoch == 0 else _ignore
        samples = TokenizedSamples(order, self.encoder, with_prompts=section.completion_only,
                                   on_encoded=record)
        return Packer(samples, batch_size=batch_size, seq_len=seq_len, pack=self.config.pack,
                      completion_only=section.completion_only, pad_id=self.encoder.pad_id)

    def _record_lengths(self, samples: list[Sample], encoded: list[Encoded]) -> None:
        by_source: dict[int, list[int]] = {}
        for sample, enc in zip(samples, encoded, strict=True):
            by_source.setdefault(sample.source, []).append(len(enc.ids))
        for source, lengths in by_source.items():
            self.counters[source].add_lengths(np.asarray(lengths, dtype=np.int64))

    def stats(self) -> list[feed_pb2.SourceStats]:
        """Per-source counters."""
        return [c.to_proto() for c in self.counters]


def _ignore(samples: list[Sample], encoded: list[Encoded]) -> None:
    """Lengths are recorded in epoch 0 only."""


def _source_weights(section: DatasetSection, specs: list[str], file: str) -> list[float]:
    weights = section.dataset_weights or {}
    unknown = sorted(set(weights) - set(specs))
    if unknown:
        raise ConfigError(f"names no source of this dataset: {unknown}", key="dataset.dataset_weights",
                          file=file, fix=f"use the exact strings from dataset.names: {specs}")
    return [weights.get(spec, 1.0) for spec in specs]


def _file_identity(path: str) -> list[object]:
    try:
        stat = os.stat(path)
    except OSError:
        return [path]
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def _fingerprint(section: DatasetSection, files: list[list[str]], tokenizer: str) -> str:
    """A hash of the sources' files, every setting that changes the samples, and the tokenizer."""
    body = {
        "settings": section.model_dump(mode="json", include=set(SAMPLE_SETTINGS)),
        "files": [[_file_identity(f) for f in group] for group in files],
        "tokenizer": tokenizer,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
