"""Why a dataset needs a new token store: which of its files changed content, were added or removed since the
newest store of the same dataset in the same cache folder (files are matched by content first, so data that
only moved is no change)."""

from __future__ import annotations

import json
import logging
import os
import re

from ..store.format import InputFile, Manifest, StoreDamaged, read_manifest
from ..store.fs import StoreFS

log = logging.getLogger(__name__)

SHOWN = 5  # files named per kind of change; the rest are counted


def previous_store(fs: StoreFS, dataset: str, fingerprint: str) -> Manifest | None:
    """The newest committed store of `dataset` under fs's root, other than `fingerprint`, that records its inputs."""
    newest: Manifest | None = None
    try:
        folders = [info for info in fs.listdir(fs.root) if info.type.name == "Directory"
                   and re.fullmatch(r"[0-9a-f]{16}", info.base_name) and info.base_name != fingerprint]
    except OSError:
        return None
    for info in folders:
        try:
            manifest = read_manifest(fs, info.path)
        except (StoreDamaged, OSError):
            continue
        if manifest.dataset == dataset and manifest.inputs is not None and (
                newest is None or manifest.created > newest.created):
            newest = manifest
    return newest


def _key(file: InputFile) -> str:
    return json.dumps(file.identity)


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def file_changes(old: list[list[InputFile]], new: list[list[InputFile]], specs: list[str]) -> list[str]:
    """Per source, what changed between two stores' inputs: files whose content changed (at the same path, or of
    the same name where the data moved), files added and files removed; [] if only paths changed (data that
    moved)."""
    said = []
    for index, spec in enumerate(specs):
        before = old[index] if index < len(old) else []
        after = new[index] if index < len(new) else []
        unmatched = {_key(f) for f in before}
        fresh = [f for f in after if _key(f) not in unmatched]
        kept = {_key(f) for f in after}
        gone = [f.path for f in before if _key(f) not in kept]
        changed, added = [], []
        for file in fresh:  # the same file, changed: at the same path, or (data that moved) of the same name
            was = next((p for p in gone if p == file.path), None) or next(
                (p for p in gone if os.path.basename(p) == os.path.basename(file.path)), None)
            if was is None:
                added.append(file.path)
            else:
                changed.append(file.path)
                gone.remove(was)
        removed = gone
        for what, paths in (("content changed", changed), ("added", added), ("removed", removed)):
            if paths:
                said.append(f"{spec}: {what}: {_names(paths)}")
    return said


def say_why_new(fs: StoreFS, dataset: str, fingerprint: str, inputs: list[list[InputFile]] | None,
                specs: list[str]) -> None:
    """Log which files make this dataset's new store (when an older store of it records its inputs)."""
    if inputs is None:
        return
    old = previous_store(fs, dataset, fingerprint)
    if old is None or old.inputs is None:
        return
    changes = file_changes(old.inputs, inputs, specs)
    if changes:
        log.warning("dataset %s: the sources' data changed since token store %s, so a new store %s is built: %s",
                    dataset, fs.uri(fs.path(old.fingerprint)), fs.uri(fs.path(fingerprint)), "; ".join(changes))
