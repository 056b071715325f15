"""One rank's stream: batches epoch after epoch, each with the cursor that resumes right after it."""

from __future__ import annotations

from dataclasses import dataclass

from ..cached.packer import CachedPacker, CachedState
from ..rows.batch import Rows
from ..store.reader import TokenStore
from ..streaming.block_mixtures import BlockPlan, next_block
from ..streaming.packer import Packer, StreamState
from .cursor import Cursor, refused
from .mixtures import Mixture, Plan
from .served import ServedDataset
from .source_change import changed_sources, sources_changed
from .stream_sources import stream_union
from .union import StreamUnion


@dataclass
class FeedItem:
    """A batch (rows set) or the end of an epoch (rows None), with the cursor right after it and its position
    (the global row where the next step of `epoch` starts; at an epoch's end, the row after its last step)."""

    rows: Rows | None
    epoch: int
    cursor: bytes
    row: int


class Feed:
    """Iterates FeedItems for (dataset, rank, world_size), starting at a cursor (any rank's, of any world size,
    made for the same seq_len) or at epoch 0. `run`: the job's run id, under which its sidecars agree on each
    epoch's files (membership.py; "": this server fixes them itself)."""

    def __init__(self, dataset: ServedDataset, *, rank: int, world_size: int, batch_size: int,
                 seq_len: int, start: Cursor | None, secret: bytes = b"", run: str = "") -> None:
        dataset.wait_ready()
        self.dataset, self.rank, self.world_size, self.secret, self.run = dataset, rank, world_size, secret, run
        self.batch_size, self.seq_len = batch_size, seq_len
        self.epochs = dataset.section.epochs
        self.epoch = start.epoch if start else 0
        self.packer: Packer | CachedPacker | None = None
        self.members: str | None = None  # the open epoch's membership (the content fingerprint it began over)
        # the open epoch's (a resumed epoch: its cursor's, and more; a resumed streaming epoch's: by block and row)
        self.plan: Plan | BlockPlan[Mixture] = dataset.mixtures.plan(self.epoch)
        self.end_row: int | None = None  # a cursor after its epoch's last step under other sources: the end's row
        self.union: StreamUnion | None = None  # streaming: the open epoch's sources, when its list changed inside it
        if start is not None and start.sources and start.sources != dataset.sources and (
                start.state is None or start.ended):
            after = start.epoch if start.state is None else start.epoch + 1
            dataset.mixtures.accepted(f"epoch {after} from its start: sources now {', '.join(dataset.specs)} (resumed "
                                      f"from the end of epoch {after - 1}, served with another list)",
                                      "sources changed on resume")
        if start is not None and start.state is not None:
            if start.ended:  # after the epoch's last step: it ends there, whatever the sources are now
                self.end_row = start.state.row
            elif start.sources == dataset.sources or isinstance(start.state, CachedState) or start.names:
                self._resume(start, start.state)
            else:
                raise refused(f"taken inside epoch {start.epoch}, which began with another list of sources (a source "
                              "was added or removed, or a source's filter changed), by a sigil-feed whose streaming "
                              "cursors do not carry their epoch's sources; resume from a cursor taken at an epoch's "
                              "end (the next epoch serves the new sources), or restore dataset.names until this "
                              "epoch ends")

    def _resume(self, start: Cursor, state: CachedState | StreamState) -> None:
        """Open the cursor's epoch at its position, under its plan and membership (cached mode: its later mixtures
        over the store of this dataset's source list, when the epoch was served under another; streaming mode: over
        the union of the epoch's source lists, when it was, stream_sources.py)."""
        dataset = self.dataset
        self.members = start.members or None  # a cursor of an epoch begun over other files resumes over them
        virtual = None
        if isinstance(state, CachedState):
            now, before = self._other_sources(start, state)  # another source list than the epoch's: its store
            if now or any(body.m for body in start.mixture or ()):  # segments over more than one store
                virtual = state.virtual
            self.plan = dataset.mixtures.resumed(self.epoch, start.mixture, state.row, "row", now)
        else:  # from the next shuffle block none of which is served, over the union of the epoch's source lists
            now, before = "", None  # when its list changed inside it (stream_sources.py)
            self.union = stream_union(dataset, start)
            if self.union is not None:
                self.members = self.union.membership.fingerprint
            self.plan = dataset.mixtures.resumed_blocks(
                self.epoch, start.mixture, next_block(state.at.block, state.at.taken, state.offset, state.wraps),
                state.row, unit=self.seq_len if dataset.config.pack else 1, pack=dataset.config.pack,
                members=self.union.current if self.union else "")
        try:
            self.packer = packer = self._open_epoch(virtual)
            if now and before is not None:
                changed_sources(dataset, self.epoch, state.row, before, dataset.members_layouts(now).store)
            if isinstance(packer, CachedPacker):
                if not isinstance(state, CachedState):
                    raise ValueError("a streaming-mode state")
                packer.set_state(state)
            elif isinstance(state, StreamState):
                packer.set_state(state)
            else:
                raise ValueError("a cached-mode state")
        except (KeyError, IndexError, ValueError, TypeError, StopIteration):
            raise refused("its position does not exist in this dataset (a state of another mode, source "
                          "list or number of virtual ranks)") from None

    def _other_sources(self, start: Cursor, state: CachedState) -> tuple[str, TokenStore | None]:
        """Cached mode: the membership whose store the resumed epoch goes on over when its source list is not this
        dataset's ("" when it is), and the store its rows before the resumed row were served from (None: the epoch
        already went on over another list, and this one is that list or the same sources again)."""
        dataset, carried = self.dataset, start.mixture or []
        now = dataset.memberships.of_epoch(self.epoch, self.run).fingerprint
        later = [body for body in carried if body.m]
        if now == start.members and not later:
            return "", None
        served = [body for body in carried if body.at < state.row]
        before = dataset.members_layouts((served[-1].m if served else None) or start.members).store
        after = dataset.members_layouts(now).store
        if not later and not sources_changed(before, after, dataset.specs):
            return "", None  # the same sources, their data moved, grown or changed: the epoch's own store
        return ("" if now == start.members else now), (before if before is not after else None)

    def _open_epoch(self, virtual: int | None = None) -> Packer | CachedPacker:
        """The epoch's packer, over the membership its cursor names, else the one the epoch has in this run (or on
        this server), and under the epoch's mixture plan (cached mode: over `virtual` virtual ranks, None: the
        config's)."""
        self.members = self.members or self.dataset.memberships.of_epoch(self.epoch, self.run).fingerprint
        self.dataset.mixtures.opened(self.epoch)
        return self.dataset.packer(epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                                   batch_size=self.batch_size, seq_len=self.seq_len, members=self.members,
                                   plan=self.plan, virtual=virtual, union=self.union)

    def _cursor(self, epoch: int, packer: Packer | CachedPacker | None) -> bytes:
        state: CachedState | StreamState | None = None
        mixture = names = None
        members = ""
        ended = False
        if isinstance(packer, Packer):  # the mixtures of the blocks served so far, and the plan by row
            stream = state = packer.get_state()
            chosen = packer.stream.blocks.mixtures
            assert chosen is not None
            until = next_block(stream.at.block, stream.at.taken, stream.offset, stream.wraps)
            blocks = chosen.blocks_before(until, through=stream.at.block if packer.past_end else None)
            mixture, members = self.dataset.mixtures.block_body(blocks, chosen.plan.rows), self.members or ""
            ended = packer.ended
            names = self.union.names if self.union else self.dataset.names
        elif packer is not None:
            assert not isinstance(self.plan, BlockPlan)
            state, mixture, members = packer.get_state(), self.dataset.mixtures.body(self.plan), self.members or ""
            ended = packer.ended
        return Cursor(self.dataset.fingerprint, epoch, self.seq_len, state, members, mixture, self.dataset.sources,
                      ended, names).encode(self.secret)

    @property
    def in_cached_epoch(self) -> bool:
        """Whether the next batch is cut from an open epoch of a local token store (quick and never blocking; a
        remote store's may wait for a shard to be fetched)."""
        return isinstance(self.packer, CachedPacker) and self.packer.never_blocks

    def __iter__(self) -> Feed:
        return self

    def __next__(self) -> FeedItem:
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        if self.end_row is not None:  # the epoch of a cursor after its last step: it ends there
            return self._ended(self.end_row)
        if self.packer is None:
            self.packer = self._open_epoch()
        rows = next(self.packer, None)
        if rows is not None:
            return FeedItem(rows, self.epoch, self._cursor(self.epoch, self.packer), self.packer.row)
        if self.packer.row == 0:
            raise StopIteration  # nothing passed the filters: end rather than spin on empty epochs
        return self._ended(self.packer.row)

    def _ended(self, end_row: int) -> FeedItem:
        """The end of the open epoch, at `end_row`; the next epoch opens over the data as it is then."""
        ended = self.epoch
        self.epoch, self.packer, self.members, self.end_row, self.union = self.epoch + 1, None, None, None, None
        self.plan = self.dataset.mixtures.plan(self.epoch)
        return FeedItem(None, ended, self._cursor(self.epoch, None), end_row)
