"""Which reader a `dataset.names` entry gets: JSONL, Parquet or a Hugging Face dataset, over the files its path
names (local, or remote: `s3://`, `gs://`, `hf://`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ...errors import SourceError
from . import jsonl, parquet
from .base import Source
from .files import expand_paths
from .hf import hub_files, open_hf
from .jsonl import JsonlSource
from .parquet import ParquetSource
from .remote import expand_remote, is_remote

log = logging.getLogger(__name__)


def _expand(spec: str, path: str, suffixes: tuple[str, ...], base_dir: Path) -> tuple[list[str], list[object] | None]:
    """The files a local or remote (`s3://`, `gs://`, `hf://`) path names, and their identities if the listing gave
    them (S3's ETags), else None."""
    if is_remote(path):
        return expand_remote(spec, path, suffixes)
    return expand_paths(spec, path, suffixes, base_dir=base_dir), None


def _open_hub(spec: str, name: str, index: int, *, base_dir: Path, cache_dir: str | None,
              files: list[str] | None, identities: list[object] | None) -> Source:
    """A Hugging Face dataset: its train files on the Hub read in place (`files` when given: what a first opening
    found), when they are all Parquet or all JSONL; else its split loaded by `datasets`."""
    found = files or hub_files(spec, name, base_dir)
    if found and is_remote(found[0]):
        if all(f.endswith(parquet.SUFFIXES) for f in found):
            return ParquetSource(spec, index, found, identities if files else None)
        if all(f.endswith(jsonl.SUFFIXES) for f in found):
            return JsonlSource(spec, index, found, identities if files else None)
        log.info("%s: its train files are not all Parquet or all JSONL; loading it through datasets", spec)
    return open_hf(spec, name, index, base_dir=base_dir, cache_dir=cache_dir)


def open_source(spec: str, index: int, *, base_dir: Path, cache_dir: str | None = None,
                files: list[str] | None = None, identities: list[object] | None = None) -> Source:
    """Open one `dataset.names` entry as source number `index` (over `files` when given, with their `identities`
    if known: a membership's; else the files its path names now); raise SourceError if it names nothing."""
    prefix, colon, rest = spec.partition(":")
    if not colon:
        return _open_hub(spec, spec, index, base_dir=base_dir, cache_dir=cache_dir, files=files, identities=identities)
    if prefix in ("local", "parquet"):
        kind, suffixes = (JsonlSource, jsonl.SUFFIXES) if prefix == "local" else (ParquetSource, parquet.SUFFIXES)
        found, listed = (files, identities) if files else _expand(spec, rest, suffixes, base_dir)
        return kind(spec, index, found, listed)
    if prefix == "hf" and rest:
        return _open_hub(spec, rest, index, base_dir=base_dir, cache_dir=cache_dir, files=files, identities=identities)
    raise SourceError(f"{spec}: unknown source; use local:PATH, parquet:PATH (a path, or s3://, gs://, hf:// URI), "
                      "hf:owner/name or owner/name")
