"""Parquet source (`parquet:PATH`): streams record batches of the needed columns, resumable by row."""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .base import RawRecord, RowSource, SourceState, row_starts

log = logging.getLogger(__name__)

SUFFIXES = (".parquet",)
COLUMNS = ("prompt", "gen", "text", "content", "path", "max_stars_repo_path", "messages", "tools",
           "_split", "_task_type", "_source")
"""The only fields any schema reads; other columns are never read."""
BATCH_ROWS = 1024


def needed_columns(names: list[str]) -> list[str]:
    """The needed columns a schema has, in schema order."""
    return [name for name in names if name in COLUMNS]


def values_of(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """A column's Python values; invalid UTF-8 in a string column becomes lone surrogates (which `normalise`
    rejects as bad_utf8) instead of failing the whole batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise
        raw = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
        return [None if v is None else v.decode(errors="surrogateescape") for v in raw.to_pylist()]


def rows_of(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """Row dicts of an Arrow batch; nulls are left out, as a missing JSON key would be."""
    names = batch.schema.names
    if not names:
        return [{} for _ in range(batch.num_rows)]
    columns = [values_of(column) for column in batch.columns]
    return [{k: v for k, v in zip(names, values, strict=True) if v is not None}
            for values in zip(*columns, strict=True)]


def first_group(meta: pq.FileMetaData, row: int) -> tuple[int, int]:
    """The row group holding a row, and that group's first row (num_row_groups past the end)."""
    start = 0
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        if row < start + rows:
            return group, start
        start += rows
    return meta.num_row_groups, start


class ParquetSource(RowSource):
    """Records of Parquet files; row is the 0-based row within the file."""

    def __init__(self, spec: str, index: int, files: list[str], batch_rows: int = BATCH_ROWS) -> None:
        self.spec, self.index, self.files, self.batch_rows = spec, index, files, batch_rows
        self._start()

    def part_starts(self, file: int, every: int) -> list[SourceState]:
        """Every `every`-th row of the file, counted from its metadata (one part if it cannot be read: reading
        it then reports bad_file)."""
        try:
            rows = pq.ParquetFile(self.files[file]).metadata.num_rows
        except (OSError, pa.ArrowException):
            return super().part_starts(file, every)
        return row_starts(file, rows, every)

    def _read(self, first_file: int, first_row: int) -> Generator[RawRecord, None, None]:
        """Yield the records from (file, row), starting at the row group that holds the row."""
        index = self.index
        for file in range(first_file, len(self.files)):
            path = self.files[file]
            row = first_row if file == first_file else 0
            try:
                with pq.ParquetFile(path) as reader:
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
            except (OSError, pa.ArrowException) as err:
                log.warning("%s: cannot read %s at row %d: %s", self.spec, path, row, err)
                self._pos = (file + 1, 0)
                yield RawRecord(index, file, row, f"{path} row {row}", None, "bad_file")
