"""Data that grows: a new store of a dataset (files added to a glob, a source added, a file's content changed)
takes the shards its other stores already hold instead of tokenizing their input again, so it builds only what is
new. A shard's name derives from the dataset's sample settings, its source's index and its file's content identity
(never the store's membership, see local_engine.source_parts), so the same input has the same name in every store.

A shard is taken whole: its tokens file linked (locally; copied where links cannot go, or on an object store), its
samples table rewritten only when the file's index changed (a file inserted before it in sorted order), its facts
written last, as a built shard's are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from ..store.format import (
    FileFacts,
    ShardFacts,
    StoreDamaged,
    read_manifest,
    read_samples,
    shard_paths,
    shard_problem,
)
from ..store.fs import StoreFS
from ..store.owner import new_owner, temp_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Donor:
    """A shard of another committed store: where that store lies, and the shard's facts there."""

    store: str
    facts: ShardFacts


def donor_shards(fs: StoreFS, store: str, dataset: str) -> dict[str, Donor]:
    """The shards of the dataset's other committed stores under fs's root, by name (the newest store's first)."""
    manifests = []
    for info in fs.listdir(fs.root):
        if info.type.name != "Directory" or not re.fullmatch(r"[0-9a-f]{16}", info.base_name) or info.path == store:
            continue
        try:
            manifest = read_manifest(fs, info.path)
        except (StoreDamaged, OSError):
            continue
        if manifest.dataset == dataset:
            manifests.append((manifest.created, info.path, manifest))
    donors: dict[str, Donor] = {}
    for _, path, manifest in sorted(manifests, key=lambda m: m[0]):
        donors.update({facts.name: Donor(path, facts) for facts in manifest.shards})
    return donors


def _copy(fs: StoreFS, source: str, target: str) -> None:
    """A whole file into place: locally a hard link (a copy across devices), else the store's own copy."""
    if not fs.is_local:
        fs.fs.copy_file(source, target)
        return
    folder, name = target.rsplit("/", 1)
    os.makedirs(folder, exist_ok=True)
    temp = f"{folder}/{temp_name(name, new_owner())}"
    try:
        try:
            os.link(source, temp)
        except OSError:
            fs.fs.copy_file(source, temp)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def adopt_shard(fs: StoreFS, store: str, donor: Donor, *, source: int, file: int) -> ShardFacts | None:
    """The donor's shard, brought into `store` as the shard of (source, file): its facts, or None (with a line in the
    log) if the donor's files are not complete and valid (the shard is then built)."""
    facts = donor.facts
    problem = shard_problem(fs, donor.store, facts)
    if problem is not None or facts.source != source:
        log.info("shard %s of %s cannot be reused (%s); building it", facts.name, fs.uri(donor.store),
                 problem or f"source {facts.source}, not {source}")
        return None
    tokens, samples, facts_path = shard_paths(store, facts.name)
    old_tokens, old_samples, _ = shard_paths(donor.store, facts.name)
    _copy(fs, old_tokens, tokens)
    table = read_samples(fs, donor.store, facts)
    if all(f == file for f in table.column("file").to_pylist()):
        _copy(fs, old_samples, samples)
    else:  # the file's index moved: the same samples, numbered as this store's file
        table = table.set_column(table.schema.get_field_index("file"), "file",
                                 pa.array([file] * table.num_rows, type=pa.int32()))
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer)
        data = buffer.getvalue().to_pybytes()
        fs.write_bytes(samples, data)
        facts = facts.model_copy(update={"samples_file": FileFacts(size=len(data),
                                                                   xxh3=xxhash.xxh3_64_hexdigest(data))})
    fs.write_bytes(facts_path, facts.model_dump_json().encode())
    return facts
