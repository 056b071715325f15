"""What every source yields: raw records with a stable id, a location for logs, or a malformed reason."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from ..stage import Count, Stage, StageState
from .identity import local_file_identities
from .remote import RemoteFile, is_remote, remote_identity


@dataclass(slots=True)
class RawRecord:
    """One record as read: its stable id (source, file, row), where it came from, and its value or error."""

    source: int
    file: int
    row: int
    location: str  # for people: "path:line" or "path row-group G row R"
    value: dict[str, Any] | None  # None when malformed
    error: str | None = None  # malformed reason (bad_json, bad_utf8, bad_type, ...) when value is None


class SourceState(StageState):
    """A source's position: the file index and row of the next record, and (plain JSONL) that row's byte offset."""

    file: Count
    row: Count
    offset: Count | None = None


class Source(Stage[RawRecord, SourceState]):
    """A resumable reader of one `dataset.names` entry."""

    spec: str
    files: list[str]
    identities: list[object] | None = None  # each file's identity, once taken or given (see `file_identities`)

    def restart(self) -> None:
        """Read again from the first record."""
        self.set_state(SourceState(file=0, row=0))

    def part_starts(self, file: int, every: int) -> list[SourceState]:
        """Where each part of a file begins when it is cut every `every` rows: states for `set_state`, the first
        at row 0. A source that cannot seek within a file, or cannot count its rows, gives one part."""
        return [SourceState(file=file, row=0)]

    def file_identities(self) -> list[object]:
        """What each file's data is, independent of where it lies (identity.py), in order: what the fingerprint of
        this source's data is made of, and its shards' names. A local file's size and content digest (never its
        path or mtime), a remote object's size and ETag or checksum. Taken once per source opened (the epoch's
        membership opens them anew), unless given when it was opened (`identities`: the membership's, or what
        the object listing said)."""
        if self.identities is None:
            self.identities = self._identities()
        return list(self.identities)

    def _identities(self) -> list[object]:
        return remote_identity(self.files) or list(local_file_identities(self.files))

    def remote_file(self, file: int, *, readahead: bool = False) -> RemoteFile | None:
        """File `file` opened for reading by ranges if it is remote (None if local), checked against the identity
        this source was given for it (RemoteChanged if the object was replaced since)."""
        path = self.files[file]
        if not is_remote(path):
            return None
        listed = self.identities[file] if self.identities is not None else None
        return RemoteFile(path, readahead=readahead, listed=listed)


class RowSource(Source):
    """A source read by a generator from a (file, row) position; subclasses implement `_read`."""

    _pos: tuple[int, int] = (0, 0)  # (file, row) of the next record; `_read` keeps it current
    _it: Generator[RawRecord, None, None]

    def _start(self) -> None:
        self._pos = (0, 0)
        self._it = self._read(0, 0)

    def _read(self, first_file: int, first_row: int) -> Generator[RawRecord, None, None]:
        raise NotImplementedError

    def __next__(self) -> RawRecord:
        return next(self._it)

    def get_state(self) -> SourceState:
        file, row = self._pos
        return SourceState(file=file, row=row)

    def set_state(self, state: SourceState) -> None:
        self._it.close()
        self._pos = (state.file, state.row)
        self._it = self._read(*self._pos)


def row_starts(file: int, rows: int, every: int) -> list[SourceState]:
    """The states of rows 0, every, 2*every, ... of a file of `rows` rows (row 0 even if it has none)."""
    return [SourceState(file=file, row=row) for row in range(0, max(rows, 1), every)]
