"""Cached mode: a source added to or removed from `names` inside an epoch, checked and reported.

The epoch's rows from the resumed row on are laid out over the store of the new source list (cached/segments.py),
each source matched with the one before by its content (cached/source_keys.py). A source named alike in both lists
whose samples differ (its files changed since the epoch began) would start again at its beginning, serving again
what was served: that resume is refused.
"""

from __future__ import annotations

from ..cached.source_keys import source_keys, specs_of
from .cursor import refused
from .mixtures import Plan, plan_at
from .served import ServedDataset


def changed_sources(dataset: ServedDataset, epoch: int, plan: Plan, row: int, members: str) -> None:
    """Check the source list change at global `row` of `epoch` (begun over `members`; `plan`, its resumed plan)
    and log it (kept for GetStats); Refused when a source kept in `names` holds other samples than before."""
    if row == 0:
        return
    before = dataset.members_layouts(plan_at(plan, row - 1).members or members).store
    after = dataset.members_layouts(plan_at(plan, row).members or members).store
    old = dict(zip(specs_of(before), source_keys(before), strict=True))
    new = dict(zip(dataset.specs, source_keys(after), strict=True))
    changed = [spec for spec in new if spec in old and old[spec] != new[spec]]
    if changed:
        raise refused(f"taken inside epoch {epoch}, served with another list of sources; {', '.join(changed)} "
                      "is in both lists but its files or samples changed since the epoch began, so it cannot "
                      "continue where it was: resume from a cursor taken at an epoch's end, or restore its files")
    added = [spec for spec, key in new.items() if key not in old.values()]
    removed = [spec for spec, key in old.items() if key not in new.values()]
    dataset.mixtures.accepted(
        f"epoch {epoch} from row {row}: sources now {', '.join(dataset.specs)} (added: {', '.join(added) or 'none'}; "
        f"removed: {', '.join(removed) or 'none'}); the sources served before continue with their unserved samples, "
        "an added one starts at its first, a removed one keeps its progress for when it comes back",
        "sources changed on resume")
