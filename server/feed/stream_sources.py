"""Streaming mode: a source added to or removed from `names` inside an epoch.

A streaming cursor inside an epoch carries the epoch's source list (each source's spec and filter override). Resumed
under another list, the epoch goes on over the union of the two, the carried list first and the added sources
after it: the shuffle block in progress is read again under the list it was drawn from (an added source weighs 0
and is not drawn, so the draws are the ones made before), and from the next shuffle block not yet begun the new
list is drawn (mixtures.py): a source served before continues from its first sample not yet drawn, an added one
starts at its first, a removed one is no longer drawn and keeps its position, in this cursor and the later ones,
for when it comes back. Each mixture of the plan names its sources by their positions in the union
(`Mixture.members`: `0,2,3`). Two lists are the same sources when each source has the same spec as the one in
its place or files in common with it (data that moved or grew: the epoch goes on over its own sources);
otherwise sources are matched by spec and filter override, and the carried sources' files must
hold what they held when the epoch began (their membership's fingerprint, the cursor's `members`, is checked).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..errors import SourceError
from .cursor import Cursor, refused
from .mixtures import MEMBERS_CHARS
from .source_names import SourceName
from .union import StreamUnion

if TYPE_CHECKING:
    from .served import ServedDataset


def _same_sources(dataset: ServedDataset, start: Cursor, carried: list[SourceName], now: list[SourceName]) -> bool:
    """Whether the two lists are the same sources in the same places: the epoch's content known here under this
    list's kinds, or each pair the same spec or files in common (by content identity: data that moved or grew)."""
    if len(carried) != len(now):
        return False
    if start.sources == dataset.sources and dataset.memberships.of(start.members) is not None:
        return True
    try:
        files = [[{json.dumps(i, default=str) for i in source} for source in dataset.membership_now(
            [name.spec for name in names]).identities] for names in (carried, now)]
    except SourceError:  # a carried source that no longer reads (it moved): the same list if of the same kinds
        return start.sources == dataset.sources
    return all(a == b or files[0][i] & files[1][i] for i, (a, b) in enumerate(zip(carried, now, strict=True)))


def stream_union(dataset: ServedDataset, start: Cursor) -> StreamUnion | None:
    """The union a streaming cursor inside its epoch resumes over, when this dataset's source list is not the one
    it carries (None: the same list, or the same sources whose data moved: the epoch goes on over its own); Refused
    when that cannot be continued exactly."""
    carried, now = start.names, dataset.names
    if carried is None:
        return None
    if all(body.m is None for body in start.mixture or ()) and (carried == now
                                                                  or _same_sources(dataset, start, carried, now)):
        return None  # the epoch's own sources, in their places (their data may have moved: see served.py)
    if dataset.section.interleave_mode == "sequential":
        raise refused(f"taken inside epoch {start.epoch}, served with another list of sources; with "
                      "interleave_mode: sequential the sources cannot change inside a streaming epoch: resume from a "
                      "cursor taken at an epoch's end, or restore dataset.names until this epoch ends")
    names = [*carried, *(name for name in now if name not in carried)]
    try:
        membership = dataset.membership_now([name.spec for name in names])
    except SourceError as err:
        raise refused(f"taken inside epoch {start.epoch}, served with another list of sources; a source of the "
                      f"epoch's shuffle block in progress, or of the new list, cannot be read ({err}): resume from a "
                      "cursor taken at an epoch's end, or restore its files") from None
    own = dataset.membership_now([name.spec for name in carried], membership)
    if own.fingerprint != start.members:
        raise refused(f"taken inside epoch {start.epoch}, served with another list of sources; the epoch's sources "
                      "hold other files than when it began, so it cannot continue where it was (streaming mode "
                      "reads the files as they are): resume from a cursor taken at an epoch's end, or restore the "
                      "files")
    current = ",".join(str(names.index(name)) for name in now)
    if len(current) > MEMBERS_CHARS:
        raise refused(f"taken inside epoch {start.epoch}, served with another list of sources; the union of the two "
                      f"lists ({len(names)} sources) is more than a cursor can name: resume from a cursor taken at "
                      "an epoch's end, or restore dataset.names until this epoch ends")
    added = [name.n for name in now if name not in carried]
    removed = [name.n for name in carried if name not in now]
    if carried != now:
        dataset.mixtures.accepted(
            f"epoch {start.epoch} from the next shuffle block: sources now {', '.join(dataset.specs)} (added: "
            f"{', '.join(added) or 'none'}; removed: {', '.join(removed) or 'none'}); the sources served before "
            "continue with their samples not yet drawn, an added one starts at its first, a removed one keeps its "
            "progress for when it comes back", "sources changed on resume")
    return StreamUnion(names, membership, current)
