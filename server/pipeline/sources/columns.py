"""The columns of an Arrow table a source reads, and its rows as records (Parquet files and Hugging Face datasets)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

COLUMNS = ("prompt", "gen", "text", "content", "path", "max_stars_repo_path", "messages", "tools",
           "_split", "_task_type", "_source")
"""The only fields any schema reads; other columns are never read."""


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
