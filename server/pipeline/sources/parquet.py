"""Parquet source (`parquet:PATH`): streams record batches of the needed columns, resumable by row."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .base import RawRecord, RowSource, SourceState, row_starts
from .columns import needed_columns, rows_of
from .remote import RemoteFile, RemoteUnavailable

log = logging.getLogger(__name__)

SUFFIXES = (".parquet",)
BATCH_ROWS = 1024


def first_group(meta: pq.FileMetaData, row: int) -> tuple[int, int]:
    """The row group holding a row, and that group's first row (num_row_groups past the end)."""
    start = 0
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        if row < start + rows:
            return group, start
        start += rows
    return meta.num_row_groups, start


@contextlib.contextmanager
def open_parquet(path: str, remote: RemoteFile | None) -> Iterator[pq.ParquetFile]:
    """A Parquet file: local (`remote` None), or the remote file given, read by ranges (its footer, then the chunks
    read) and closed with it."""
    with contextlib.ExitStack() as stack:
        if remote is not None:
            stack.enter_context(remote)
        yield stack.enter_context(pq.ParquetFile(remote or path))


class ParquetSource(RowSource):
    """Records of Parquet files; row is the 0-based row within the file."""

    def __init__(self, spec: str, index: int, files: list[str], identities: list[object] | None = None,
                 batch_rows: int = BATCH_ROWS) -> None:
        self.spec, self.index, self.files, self.identities, self.batch_rows = spec, index, files, identities, batch_rows
        self._start()

    def part_starts(self, file: int, every: int) -> list[SourceState]:
        """Every `every`-th row of the file, counted from its metadata (one part if it cannot be read: reading
        it then reports bad_file)."""
        try:
            with open_parquet(self.files[file], self.remote_file(file)) as reader:
                rows = reader.metadata.num_rows
        except RemoteUnavailable:
            raise
        except (OSError, pa.ArrowException):
            return super().part_starts(file, every)
        return row_starts(file, rows, every)

    def _read(self, first_file: int, first_row: int) -> Generator[RawRecord, None, None]:
        """Yield the records from (file, row), starting at the row group that holds the row."""
        index = self.index
        for file in range(first_file, len(self.files)):
            path = self.files[file]
            row = first_row if file == first_file else 0
            remote = None
            try:
                remote = self.remote_file(file)
                with open_parquet(path, remote) as reader:
                    columns = needed_columns(reader.schema_arrow.names)
                    first, start = first_group(reader.metadata, row)
                    for group in range(first, reader.metadata.num_row_groups):
                        batches = reader.iter_batches(self.batch_rows, row_groups=[group], columns=columns)
                        for batch in batches:
                            skip = min(max(row - start, 0), batch.num_rows)
                            start += batch.num_rows
                            for value in rows_of(batch.slice(skip)):
                                row += 1
                                self._pos = (file, row)
                                location = f"{path} row-group {group} row {row - 1}"
                                yield RawRecord(index, file, row - 1, location, value)
                if remote is not None:
                    remote.check_unchanged()  # its row groups were read by ranges, at the footer's offsets
            except RemoteUnavailable:
                raise  # storage that does not answer is no bad file: the stream or build is tried again
            except (OSError, pa.ArrowException) as err:
                if remote is not None:
                    remote.check_unchanged()  # an object replaced while read is no bad file
                log.warning("%s: cannot read %s at row %d: %s", self.spec, path, row, err)
                self._pos = (file + 1, 0)
                yield RawRecord(index, file, row, f"{path} row {row}", None, "bad_file")
            finally:
                if remote is not None:
                    remote.close()
