"""JSONL source (`local:PATH`): streams plain, gzip or zstd files line by line, resumable by line."""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Generator
from itertools import islice
from typing import Any, BinaryIO

import orjson
import zstandard

from ...progress import QUIET_S, Progress, file_bytes
from .base import RawRecord, Source, SourceState
from .remote import RemoteFile, RemoteUnavailable

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
BUFFER_BYTES = 1 << 20
ZSTD_MAX_WINDOW = 1 << 31  # accept files written with `zstd --long=31`
ZSTD_INPUT_BYTES = 1 << 13  # compressed bytes per step: bounds what one step may expand to
ORJSON_MAX_BYTES = 1024  # at most 512 levels deep: far below json.loads' recursion limit (orjson has none)
READ_ERRORS = (OSError, EOFError, zstandard.ZstdError)  # unreadable, truncated gzip or zstd, corrupt zstd


def is_plain(path: str) -> bool:
    """Whether a file is read uncompressed, so a byte offset can locate a line."""
    return not path.endswith((".gz", ".zst", ".zstd"))


class ZstdReader(io.RawIOBase):
    """The decompressed bytes of a zstd file, frame after frame; like gzip, it raises EOFError when the file
    ends inside a frame (zstandard's own stream reader ends quietly there, so a cut file lost data silently)."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._context = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._frame = self._context.decompressobj()
        self._in_frame = False  # part of a frame was read and its end was not
        self._input = b""  # compressed bytes read after the end of the last frame
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill buffer with decompressed bytes; 0 at the end of the last frame."""
        while not self._output:
            data, self._input = self._input or self._file.read(ZSTD_INPUT_BYTES), b""
            if not data:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of its last zstd frame")
                return 0
            self._output = memoryview(self._frame.decompress(data))
            self._in_frame = not self._frame.eof
            if self._frame.eof:
                self._input, self._frame = self._frame.unused_data, self._context.decompressobj()
        size = min(len(buffer), len(self._output))
        buffer[:size], self._output = self._output[:size], self._output[size:]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def open_lines(path: str, remote: RemoteFile | None) -> io.BufferedIOBase:
    """Open a JSONL file for binary line iteration, decompressing by suffix: local (`remote` None), or the remote
    file given (opened with readahead), read in BUFFER_BYTES ranges whatever the decompressor asks for at a time."""
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=io.BufferedReader(remote, BUFFER_BYTES)) if remote else gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        raw = io.BufferedReader(remote, BUFFER_BYTES) if remote else io.FileIO(path)
        return io.BufferedReader(ZstdReader(raw), BUFFER_BYTES)
    return io.BufferedReader(remote or io.FileIO(path), BUFFER_BYTES)


def json_error(err: Exception) -> str:
    """The malformed reason of a line json cannot load: too_deep if only its nesting was too deep."""
    return "too_deep" if isinstance(err, RecursionError) else "bad_json"


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


def parse_failed(line: bytes, err: Exception) -> tuple[dict[str, Any] | None, str | None] | None:
    """Classify a line json rejected with err: None if blank, a value if only a BOM was in the way, else a reason."""
    if line.isspace():
        return None
    try:
        text = line.decode()
    except UnicodeDecodeError:
        return None, "bad_utf8"
    if text.startswith("\ufeff"):
        try:
            value = json.loads(text[1:])
        except (ValueError, RecursionError) as retry:
            return None, json_error(retry)
        return (value, None) if type(value) is dict else (None, "bad_type")
    return None, json_error(err)


class JsonlSource(Source):
    """Records of JSONL files; row is the 0-based line index, so blank lines are skipped but counted."""

    def __init__(self, spec: str, index: int, files: list[str], identities: list[object] | None = None) -> None:
        self.spec, self.index, self.files, self.identities = spec, index, files, identities
        self._pos: tuple[int, int, int | None] = (0, 0, 0)  # (file, row, byte offset) of the next line
        self._it = self._read(0, 0, 0)

    def __next__(self) -> RawRecord:
        return next(self._it)

    def get_state(self) -> SourceState:
        file, row, offset = self._pos
        if offset is not None and file < len(self.files) and is_plain(self.files[file]):
            return SourceState(file=file, row=row, offset=offset)
        return SourceState(file=file, row=row)

    def set_state(self, state: SourceState) -> None:
        self._it.close()
        self._pos = (state.file, state.row, state.offset)
        self._it = self._read(*self._pos)

    def part_starts(self, file: int, every: int) -> list[SourceState]:
        """Every `every`-th line of a plain file with its byte offset, found by one pass over its lines. A
        compressed file is one part: it cannot seek, so part k would decompress everything before it again."""
        path = self.files[file]
        if not is_plain(path):
            return super().part_starts(file, every)
        starts = [SourceState(file=file, row=0, offset=0)]
        try:
            with open_lines(path, self.remote_file(file, readahead=True)) as lines, \
                    Progress(f"{self.spec}: finding the parts of {path}", after_s=QUIET_S, total=file_bytes(path),
                             label="finding parts") as report:
                offset = 0
                for row, line in enumerate(lines, 1):
                    offset += len(line)
                    if row % every == 0:
                        starts.append(SourceState(file=file, row=row, offset=offset))
                        report.at(offset)
                report.at(offset)
                if len(starts) > 1 and starts[-1].offset == offset:
                    starts.pop()  # the file ends where that part would begin
        except RemoteUnavailable:
            raise
        except OSError:
            return super().part_starts(file, every)  # reading it reports bad_file
        return starts

    def _read(self, first_file: int, first_row: int,
              first_offset: int | None) -> Generator[RawRecord, None, None]:
        """Yield the records from (file, row); seek to offset when given for a plain file."""
        index = self.index
        for file in range(first_file, len(self.files)):
            path = self.files[file]
            row, offset = (first_row, first_offset) if file == first_file else (0, 0)
            remote = None
            try:
                remote = self.remote_file(file, readahead=True)
                with open_lines(path, remote) as lines:
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
                        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
                            failed = parse_failed(line, err)
                            if failed is None:
                                continue
                            value, error = failed
                        self._pos = (file, row, offset)
                        yield RawRecord(index, file, row - 1, f"{path}:{row}", value, error)
            except RemoteUnavailable:
                raise  # storage that does not answer is no bad file: the stream or build is tried again
            except READ_ERRORS as err:
                if remote is not None:
                    remote.check_unchanged()  # an object replaced while read is no bad file either
                log.warning("%s: cannot read %s after line %d, its last good line (%s); the rest of the file "
                            "is skipped", self.spec, path, row, err)
                self._pos = (file + 1, 0, 0)
                yield RawRecord(index, file, row, f"{path}:{row + 1}", None, "bad_file")
            finally:
                if remote is not None:
                    remote.close()  # gzip leaves the file it was given open
