"""Cached mode: a source added to or removed from `names` inside an epoch, recognised, checked and reported.

Two source lists are the same sources when each source of one pairs with exactly one of the other: the same spec,
or files in common (data that moved, or grew, is the same source). Then a resumed epoch goes on over its own
store, whatever its data became. Otherwise the epoch's rows from the resumed row on are laid out over the store of
the new source list (cached/segments.py), each source matched with the one before by its content
(cached/source_keys.py). A source paired with one before whose samples differ (its files changed since the epoch
began) would start again at its beginning, serving again what was served: that resume is refused.
"""

from __future__ import annotations

import json

from ..cached.source_keys import source_keys, specs_of
from ..store.reader import TokenStore
from .cursor import refused
from .served import ServedDataset


def _pairs(before: TokenStore, after: TokenStore, specs: list[str]) -> list[tuple[int, int]]:
    """The (source before, source after) pairs that are one source: the same spec, or files in common."""
    files = [[{json.dumps(f.identity, default=str) for f in source} for source in store.manifest.inputs or ()]
             for store in (before, after)]
    old_specs = specs_of(before)
    return [(i, j) for i in range(len(old_specs)) for j in range(len(specs))
            if old_specs[i] == specs[j] or (files[0] and files[1] and files[0][i] & files[1][j])]


def sources_changed(before: TokenStore, after: TokenStore, specs: list[str]) -> bool:
    """Whether `after`'s sources (named `specs`) are another list than `before`'s: a source added or removed (not
    every source pairs with exactly one of the other list)."""
    pairs = _pairs(before, after, specs)
    return not (len(specs_of(before)) == len(specs) == len(pairs) == len({i for i, _ in pairs})
                == len({j for _, j in pairs}))


def changed_sources(dataset: ServedDataset, epoch: int, row: int, before: TokenStore, after: TokenStore) -> None:
    """Check the source list change at global `row` of `epoch` (from the store of `before`'s list to `after`'s, this
    dataset's) and log it (kept for GetStats); Refused when a source in both lists holds other samples than
    before."""
    old_keys, new_keys = source_keys(before), source_keys(after)
    changed = sorted({dataset.specs[j] for i, j in _pairs(before, after, dataset.specs) if old_keys[i] != new_keys[j]})
    if changed:
        raise refused(f"taken inside epoch {epoch}, served with another list of sources; {', '.join(changed)} is "
                      "in both lists but its files, or its filter, changed since the epoch began, so it cannot "
                      "continue where it was: resume from a cursor taken at an epoch's end, or restore its files")
    added = [spec for spec, key in zip(dataset.specs, new_keys, strict=True) if key not in old_keys]
    removed = [spec for spec, key in zip(specs_of(before), old_keys, strict=True) if key not in new_keys]
    if added or removed:
        dataset.mixtures.accepted(
            f"epoch {epoch} from row {row}: sources now {', '.join(dataset.specs)} (added: "
            f"{', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}); the sources served before "
            "continue with their unserved samples, an added one starts at its first, a removed one keeps its "
            "progress for when it comes back", "sources changed on resume")
