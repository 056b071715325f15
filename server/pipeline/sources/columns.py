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


def _as_binary(kind: pa.DataType) -> pa.DataType:
    """The type with every string inside it (at any depth: lists, structs, maps) as binary of the same width."""
    if pa.types.is_string(kind):
        return pa.binary()
    if pa.types.is_large_string(kind):
        return pa.large_binary()
    if pa.types.is_string_view(kind):
        return pa.binary_view()
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_as_binary(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_as_binary(kind.value_type)))
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(kind.value_field.with_type(_as_binary(kind.value_type)), kind.list_size)
    if pa.types.is_map(kind):
        return pa.map_(kind.key_field.with_type(_as_binary(kind.key_type)),
                       kind.item_field.with_type(_as_binary(kind.item_type)), kind.keys_sorted)
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_as_binary(field.type)) for field in kind])
    if pa.types.is_dictionary(kind):
        return _as_binary(kind.value_type)
    return kind


def _decoded(value: Any) -> Any:
    """A binary-cast value back as text: bytes decoded with lone surrogates for invalid UTF-8, at any depth."""
    if isinstance(value, bytes):
        return value.decode(errors="surrogateescape")
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    if isinstance(value, tuple):  # a map's (key, item) pair
        return tuple(_decoded(v) for v in value)
    if isinstance(value, dict):
        return {k: _decoded(v) for k, v in value.items()}
    return value


def values_of(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    """A column's Python values; invalid UTF-8 in a string, at any depth (a `messages` column's turns too), becomes
    lone surrogates (which `normalise` rejects as bad_utf8) instead of failing the whole batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        binary = _as_binary(column.type)
        if binary == column.type:
            raise
        return [_decoded(v) for v in column.cast(binary).to_pylist()]


def rows_of(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """Row dicts of an Arrow batch; nulls are left out, as a missing JSON key would be."""
    names = batch.schema.names
    if not names:
        return [{} for _ in range(batch.num_rows)]
    columns = [values_of(column) for column in batch.columns]
    return [{k: v for k, v in zip(names, values, strict=True) if v is not None}
            for values in zip(*columns, strict=True)]
