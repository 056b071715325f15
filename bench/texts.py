"""The texts sigil-feed serves from a corpus, curated the way the trainer does it, for in-process baselines.

Uses the server's own record normalisation and filters with the default settings, so a baseline tokenizes
exactly the samples a sigil-feed epoch holds (before packing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sigil_feed.server.config import DatasetSection
from sigil_feed.server.pipeline.filters import FilterFn, make_filter
from sigil_feed.server.pipeline.samples import Sample, normalise
from sigil_feed.server.pipeline.sources.base import RawRecord

SPLITS = frozenset({"train"})


def trainer_filter() -> FilterFn:
    """The default dataset section's filter: (path, text) -> drop reason or None."""
    return make_filter(DatasetSection())


def keep(kind: str, split: str | None, path: str | None, text: str, rule: FilterFn) -> bool:
    """The server's curation rule: the split must be served; code files and text pass the filter."""
    if (split or "train") not in SPLITS:
        return False
    return kind == "pair" or rule(path, text) is None


def curated_samples(files: list[Path]) -> Iterator[Sample]:
    """Every kept sample, in source order (the sequential mix)."""
    rule = trainer_filter()
    for source, path in enumerate(files):
        with path.open("rb") as lines:
            for row, line in enumerate(lines):
                sample = normalise(RawRecord(source, 0, row, f"{path}:{row + 1}", json.loads(line)))
                if isinstance(sample, str):
                    continue
                if keep(sample.kind, sample.split, sample.path, sample.text, rule):
                    yield sample


def curated_texts(files: list[Path]) -> Iterator[str]:
    """Every kept sample's training text, in source order (the sequential mix)."""
    return (sample.text for sample in curated_samples(files))
