"""Where a token store lives: a local folder or a URI (`s3://`, `gs://`, `file://`), reached through pyarrow.fs.

S3 settings come from the standard environment: `AWS_ENDPOINT_URL` (an S3-compatible server; `http://` for
plain HTTP), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` or
`AWS_DEFAULT_REGION`. Writes are all-or-nothing: locally a unique temporary file renamed into place, on an
object store one PUT (or one multipart upload, which is visible only once complete).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from .owner import new_owner, temp_name
from .s3 import s3_filesystem


@dataclass(frozen=True)
class StoreFS:
    """A filesystem and a root path on it; paths passed to the methods are full paths on `fs` (see `path`)."""

    fs: pafs.FileSystem
    root: str  # the location's path on fs, without a scheme
    location: str  # as configured, for messages

    @property
    def is_local(self) -> bool:
        """Whether paths are local files (memory-mappable where they lie)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """A path under the root."""
        return "/".join([self.root.rstrip("/"), *parts]) if self.root else "/".join(parts)

    def uri(self, path: str) -> str:
        """A path as people write it: a local path, or `scheme://path`."""
        return path if self.is_local else f"{self.fs.type_name.replace('gcs', 'gs')}://{path}"

    def exists(self, path: str) -> bool:
        """Whether a file is there."""
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def size(self, path: str) -> int | None:
        """A file's size in bytes, None if it is not there."""
        info = self.fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None

    def listdir(self, path: str) -> list[pafs.FileInfo]:
        """The entries directly under a folder (none if it is not there)."""
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    def read_bytes(self, path: str) -> bytes:
        """A whole file; FileNotFoundError if it is not there."""
        with self.fs.open_input_stream(path) as f:
            return f.read()

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[pa.NativeFile]:
        """A stream that becomes the file at `path` only if the block completes (never half a file)."""
        if not self.is_local:
            with self.fs.open_output_stream(path) as out:
                yield out
            return
        folder, name = path.rsplit("/", 1)
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/{temp_name(name, new_owner())}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                yield out
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file, all or nothing."""
        with self.open_write(path) as out:
            out.write(data)

    def delete(self, path: str) -> None:
        """Remove a file if it is there."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)

    def local_path(self, path: str) -> Path:
        """The local file behind a path (local stores only)."""
        if not self.is_local:
            raise ValueError(f"{self.uri(path)} is not a local file")
        return Path(path)


def is_uri(location: str) -> bool:
    """Whether a location names a filesystem by scheme (`s3://...`) rather than a local path."""
    return "://" in location


def resolve(location: str | os.PathLike[str]) -> StoreFS:
    """The filesystem and root of a store location: a local path, `file://`, `s3://bucket/prefix`, `gs://...`,
    or any other URI pyarrow understands."""
    text = os.fspath(location)
    if not is_uri(text):
        return StoreFS(pafs.LocalFileSystem(), str(Path(text).expanduser().absolute()), text)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return StoreFS(pafs.LocalFileSystem(), str(Path(parsed.path).absolute()), text)
    if parsed.scheme in ("s3", "s3a"):
        return StoreFS(s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/"), text)
    fs, root = pafs.FileSystem.from_uri(text)
    return StoreFS(fs, root.rstrip("/"), text)
