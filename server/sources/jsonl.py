"""JSONL source (`local:PATH`): streams plain, gzip or zstd files line by line, resumable by line."""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Generator
from itertools import islice
from typing import Any

import orjson
import zstandard

from ..stage import State
from .base import RawRecord, Source

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
BUFFER_BYTES = 1 << 20
ZSTD_MAX_WINDOW = 1 << 31  # accept files written with `zstd --long=31`
ORJSON_MAX_BYTES = 1024  # at most 512 levels deep: far below json.loads' recursion limit (orjson has none)
READ_ERRORS = (OSError, EOFError, zstandard.ZstdError)  # unreadable, truncated gzip, corrupt zstd


def is_plain(path: str) -> bool:
    """Whether a file is read uncompressed, so a byte offset can locate a line."""
    return not path.endswith((".gz", ".zst", ".zstd"))


def open_lines(path: str) -> io.BufferedIOBase:
    """Open a JSONL file for binary line iteration, decompressing by suffix."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        reader = decompressor.stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)  # noqa: SIM115
        return io.BufferedReader(reader, BUFFER_BYTES)  # type: ignore[arg-type]
    return io.BufferedReader(io.FileIO(path), BUFFER_BYTES)


def loads(line: bytes) -> Any:
    """json.loads, with orjson (several times faster) first on short lines. orjson accepts a subset of what
    json.loads does (no NaN, no lone surrogates; the same values but for integers beyond 64 bits, which no
    sample field reads); a short line cannot nest deeply enough to reach json.loads' recursion limit."""
    if len(line) <= ORJSON_MAX_BYTES:
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass
    return json.loads(line.decode())


def parse_failed(line: bytes) -> tuple[dict[str, Any] | None, str | None] | None:
    """Classify a rejected line: None if blank, a value if only a BOM was in the way, else a reason."""
    if line.isspace():
        return None
    try:
        text = line.decode()
    except UnicodeDecodeError:
        return None, "bad_utf8"
    if text.startswith("\ufeff"):
        try:
            value = json.loads(text[1:])
        except (ValueError, RecursionError):
            return None, "bad_json"
        return (value, None) if type(value) is dict else (None, "bad_type")
    return None, "bad_json"


class JsonlSource(Source):
    """Records of JSONL files; row is the 0-based line index, so blank lines are skipped but counted."""

    def __init__(self, spec: str, index: int, files: list[str]) -> None:
        self.spec, self.index, self.files = spec, index, files
        self._pos: tuple[int, int, int | None] = (0, 0, 0)  # (file, row, byte offset) of the next line
        self._it = self._read(0, 0, 0)

    def __next__(self) -> RawRecord:
        return next(self._it)

    def get_state(self) -> State:
        file, row, offset = self._pos
        if offset is not None and file < len(self.files) and is_plain(self.files[file]):
            return {"file": file, "row": row, "offset": offset}
        return {"file": file, "row": row}

    def set_state(self, state: State) -> None:
        self._it.close()
        file, row, offset = int(state["file"]), int(state["row"]), state.get("offset")
        self._pos = (file, row, None if offset is None else int(offset))
        self._it = self._read(*self._pos)

    def _read(self, first_file: int, first_row: int,
              first_offset: int | None) -> Generator[RawRecord, None, None]:
        """Yield the records from (file, row); seek to offset when given for a plain file."""
        index = self.index
        for file in range(first_file, len(self.files)):
            path = self.files[file]
            row, offset = (first_row, first_offset) if file == first_file else (0, 0)
            try:
                with open_lines(path) as lines:
                    if offset is not None and is_plain(path):
                        lines.seek(offset)
                    else:
                        offset = sum(len(line) for line in islice(lines, row))
                    for line in lines:
                        row += 1
                        offset += len(line)
                        try:
                            value, error = loads(line), None
                            if type(value) is not dict:
                                value, error = None, "bad_type"
                        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
                            failed = parse_failed(line)
                            if failed is None:
                                continue
                            value, error = failed
                        self._pos = (file, row, offset)
                        yield RawRecord(index, file, row - 1, f"{path}:{row}", value, error)
            except READ_ERRORS as err:
                log.warning("%s: cannot read %s at line %d: %s", self.spec, path, row + 1, err)
                self._pos = (file + 1, 0, 0)
                yield RawRecord(index, file, row, f"{path}:{row + 1}", None, "bad_file")
