"""Source files on object storage (`s3://`, `gs://`) and on the Hugging Face Hub (`hf://`), read in place.

Every remote file is read through pyarrow.fs, the store's filesystem layer (see store/fs.py for the S3
environment; `hf://` goes through huggingface_hub's HfFileSystem, wrapped for pyarrow), and listed through it (on
S3 through boto3: listing.py, the ETags come with the listing). `RemoteFile` reads ranges at the positions asked
for (a JSONL file 1 MiB at a time from any offset, a Parquet file's footer and the column chunks of the row groups
read), so nothing is fetched whole. A read that fails for a transient reason is tried again within the storage
retry window (store/retry.py); past it `RemoteUnavailable` ends the read.
Credentials come from the standard environment (`AWS_*`, `HF_TOKEN`) and are never part of a path or a message.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from ...errors import SourceError, Unavailable
from ...store.fs import resolve
from ...store.retry import Retries, storage_retry
from .files import GLOB_CHARS, _matches
from .listing import Listed, entry, files_under

log = logging.getLogger(__name__)

SCHEMES = ("s3", "s3a", "gs", "gcs", "hf")
IDENTITY_WORKERS = 16  # HEAD requests in flight while identities the listing did not give are taken
HF_BLOCK_BYTES = 1 << 16  # what HfFileSystem fetches past a read (its default, 5 MB, would fetch far more)
READAHEAD_WORKERS = 8  # ranges read ahead at once, over every file read front to back
ETAG_KEYS = ("ETag", "etag", "x-goog-hash", "Content-MD5")
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
T = TypeVar("T")


class RemoteUnavailable(Unavailable, OSError):
    """Remote storage did not answer within the storage retry window. An Unavailable (a stream ends UNAVAILABLE and
    the client resumes) and an OSError (a store build is tried again later), never a bad file."""


class RemoteChanged(RemoteUnavailable):
    """An object was replaced while it was read by ranges (its ETag changed), so the ranges read may mix two
    versions: the read ends as storage that did not answer does (a stream ends UNAVAILABLE, a build is tried again
    later), never with records of both versions passed on as one file."""


def _tag(meta: Any) -> str | None:
    """The ETag or checksum in an object's metadata (None if the store gives none)."""
    tag = next((meta[k] for k in ETAG_KEYS if k in meta), None) if meta else None
    return tag.decode() if isinstance(tag, bytes) else tag


def is_remote(path: str) -> bool:
    """Whether a source path names a file on object storage or the Hub (`scheme://...`)."""
    return urlparse(path).scheme in SCHEMES and "://" in path


def _transient_errors() -> tuple[type[BaseException], ...]:
    """What a transient failure raises: OSError (pyarrow, requests) and httpx's transport errors (the Hub)."""
    try:
        import httpx
    except ImportError:
        return (OSError,)
    return (OSError, httpx.TransportError)


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, env: tuple[tuple[str, str], ...]) -> pafs.FileSystem:
    """One filesystem per scheme, bucket and environment (`env` keys the cache: a changed endpoint or key
    makes a new one)."""
    if scheme == "hf":
        from huggingface_hub import HfFileSystem

        settings = dict(env)  # the token: HF_TOKEN, or the one `hf auth login` saved, as huggingface_hub finds it
        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem(endpoint=settings.get("HF_ENDPOINT") or None,
                                                                 block_size=HF_BLOCK_BYTES)))
    return resolve(f"{scheme}://{netloc}").fs


def _env(scheme: str) -> tuple[tuple[str, str], ...]:
    prefix = "HF_" if scheme == "hf" else ("AWS_" if scheme.startswith("s3") else "GOOGLE_")
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(prefix)))


def locate(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a remote path and the path on it (`bucket/key`, or `datasets/owner/name/...` on the Hub)."""
    parsed = urlparse(uri)
    path = uri.split("://", 1)[1]
    return _filesystem(parsed.scheme, "" if parsed.scheme == "hf" else parsed.netloc, _env(parsed.scheme)), path


def retrying(what: str, call: Callable[[], T], retries: Retries | None = None) -> T:
    """`call()`, tried again after transient failures within the storage retry window (RemoteUnavailable past
    it); a missing file or a refused permission raises at once."""
    retries = retries or storage_retry().start()
    transient = _transient_errors()
    while True:
        try:
            return call()
        except (*PERMANENT, RemoteUnavailable):  # RemoteUnavailable: a verdict already (RemoteChanged)
            raise
        except transient as err:
            refused = _refusal(what, err)
            if refused is not None:
                raise refused from err
            if not retries.wait():
                raise RemoteUnavailable(f"cannot read {what}: {type(err).__name__}: {err}; "
                                        f"{retries.describe()}") from err
            log.warning("reading %s failed (%s: %s); trying again", what, type(err).__name__, err)


def _refusal(what: str, err: BaseException) -> OSError | None:
    """A transport error that is the server's answer, not an outage: an HTTP 4xx response (the Hub's gated or
    missing file, a bad token) other than a timeout (408) or throttling (429), as the permanent error it means
    (FileNotFoundError for 404 and 410, else PermissionError); None for anything worth trying again."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if not isinstance(status, int) or not 400 <= status < 500 or status in (408, 429):
        return None
    kind = FileNotFoundError if status in (404, 410) else PermissionError
    return kind(f"cannot read {what}: the server answered HTTP {status} ({type(err).__name__})")


@functools.lru_cache(maxsize=1)
def _readahead_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(READAHEAD_WORKERS, thread_name_prefix="readahead")


def _is_listed(listed: object, size: int, tag: str | None) -> bool:
    """Whether an object opened with this size and ETag is the one whose identity was `listed` (object_identity,
    taken when the epoch's files were listed); true if there is no identity or no ETag to compare."""
    return tag is None or not isinstance(listed, list) or len(listed) != 2 or listed == [size, tag]


class RemoteFile(io.RawIOBase):
    """A remote file as a seekable binary file: each read is one ranged request at the current position. With
    `readahead` (a file read front to back), from the second of consecutive reads on, the next range of the same
    size is requested while the caller works on this one (a caller that reads one range, a probe of the first
    records, costs no second). `listed`: the file's identity as listed (its size and ETag); an object found with
    another at the first open was replaced since (RemoteChanged: its records are not those the identity names)."""

    def __init__(self, uri: str, *, readahead: bool = False, listed: object = None) -> None:
        self.uri, self.readahead, self.listed = uri, readahead, listed
        self._fs, self._path = locate(uri)
        self._handle: Any = None
        self._pos = 0
        self._ahead: tuple[int, int, Future[bytes]] | None = None  # (offset, size, its read)
        self._last_end = -1  # where the last read ended
        self._reads = 0  # ranges read: an object read in one range cannot mix versions
        self._retries = storage_retry().start()
        self.tag: str | None = None  # the ETag at the first open: `listed`, every later open and the end must agree
        self.size = retrying(uri, self._open, self._retries)

    def _open(self) -> int:
        handle = self._fs.open_input_file(self._path)
        tag, size = _tag(handle.metadata()), int(handle.size())
        if self._handle is None and self.tag is not None and (tag, size) != (self.tag, self.size):
            handle.close()
            raise self._changed(tag)
        if self.tag is None and not _is_listed(self.listed, size, tag):
            handle.close()
            raise RemoteChanged(f"{self.uri} was replaced since it was listed ([size, ETag] {self.listed} -> "
                                f"{[size, tag]}); it is read again from its new content")
        self._handle, self.tag = handle, self.tag or tag
        return size

    def _changed(self, tag: str | None) -> RemoteChanged:
        return RemoteChanged(f"{self.uri} was replaced while it was read (ETag {self.tag} -> {tag}); it is read "
                             "again from its new content")

    def check_unchanged(self) -> None:
        """RemoteChanged if the object is no longer the one opened (at the end of a read in several ranges, and
        where its bytes failed to parse: a replaced object is no bad file)."""
        def tag_now() -> str | None:
            with self._fs.open_input_file(self._path) as handle:
                return _tag(handle.metadata())
        tag = retrying(self.uri, tag_now, self._retries)
        if tag != self.tag:
            raise self._changed(tag)

    def _read_at(self, size: int, offset: int) -> bytes:
        if self._handle is None:
            self._open()
        try:
            return bytes(self._handle.read_at(size, offset))
        except BaseException:
            self._drop()
            raise

    def _fetch(self, size: int, offset: int) -> bytes:
        """The range, from the read ahead if it asked for it (if that read failed, it is read again here)."""
        ahead = self._take_ahead()
        if ahead is not None and ahead[:2] == (offset, size):
            with contextlib.suppress(Exception):
                return ahead[2].result()
        return self._read_at(size, offset)

    def _take_ahead(self) -> tuple[int, int, Future[bytes]] | None:
        """The pending read ahead, no longer pending (waited for if it is running: it uses the handle)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not ahead[2].cancel():
            wait([ahead[2]])
        return ahead

    def _read_next(self, size: int) -> None:
        """Ask for the range after the current position, if any."""
        handle, offset = self._handle, self._pos
        if handle is None or offset >= self.size:
            return
        size = min(size, self.size - offset)
        self._ahead = (offset, size, _readahead_pool().submit(lambda: bytes(handle.read_at(size, offset))))

    def _drop(self) -> None:
        self._take_ahead()
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close too; dropped either way
                handle.close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes from the current position (all that is left if size is None or negative)."""
        left = max(self.size - self._pos, 0)
        size = left if size is None or size < 0 else min(size, left)
        if size == 0:
            return b""
        consecutive = self._pos == self._last_end
        data = retrying(self.uri, lambda: self._fetch(size, self._pos), self._retries)
        self._retries.progressed()
        self._pos += len(data)
        self._last_end = self._pos
        self._reads += 1
        if self._pos >= self.size and self._reads > 1 and self.tag is not None:
            self.check_unchanged()
        if self.readahead and consecutive:
            self._read_next(size)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def _uri(scheme: str, path: str) -> str:
    return f"{scheme}://{path}"


def redacted(text: str) -> str:
    """Text with the user and password of any URI in it left out (`s3://***@bucket/...`)."""
    return re.sub(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1***@", text)


def _check_uri(spec: str, uri: str) -> None:
    """SourceError (the URI's secret left out) for credentials written into a URI: they would show wherever the
    source is named (logs, stats, errors), and the standard environment is where they are read from."""
    parsed = urlparse(uri)
    if parsed.password is not None or (parsed.username is not None and parsed.username != "anonymous"):
        raise SourceError(f"{redacted(spec)}: credentials in a source's URI are not read (they would appear in logs "
                          "and stats); remove them and give them through the environment: AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (S3), the default credentials (GCS), HF_TOKEN (the Hub)")


def expand_remote(spec: str, uri: str, suffixes: tuple[str, ...]) -> tuple[list[str], list[object] | None]:
    """The sorted files a remote path names, by the rules of local paths: a file; a folder (prefix): its files
    ending with a suffix; a glob (`**` for any number of non-hidden folders): the files it matches and the files
    ending with a suffix in the folders it matches. With them, their identities (`object_identity`) when the
    listing gave every one (S3 listed by boto3, listing.py), else None. SourceError if none, or if the URI is not
    one storage takes."""
    _check_uri(spec, uri)
    try:
        return _expand_remote(spec, uri, suffixes)
    except pa.ArrowInvalid as err:
        raise SourceError(f"{spec}: {uri} is not a path this storage takes: {err}") from None


def _expand_remote(spec: str, uri: str, suffixes: tuple[str, ...]) -> tuple[list[str], list[object] | None]:
    scheme = urlparse(uri).scheme
    fs, path = locate(uri)
    found: list[Listed] = []
    if not any(c in path for c in GLOB_CHARS):
        named = retrying(uri, lambda: entry(fs, path))
        if isinstance(named, Listed):
            found = [named]
        elif named == pafs.FileType.Directory:
            found = [f for f in retrying(uri, lambda: files_under(fs, path, recursive=False))
                     if f.base_name.endswith(suffixes)]
    else:
        parts = path.split("/")
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
        root, wanted = "/".join(parts[:fixed]), tuple(parts[fixed:])
        for info in retrying(uri, lambda: files_under(fs, root, recursive=True)):
            rel = tuple(info.path[len(root):].strip("/").split("/"))
            if _matches(rel, wanted) or (info.base_name.endswith(suffixes) and _matches(rel[:-1], wanted)):
                found.append(info)
    if not found:
        wanted_names = ", ".join(f"*{s}" for s in suffixes)
        raise SourceError(f"{spec}: no files found at {uri} (an object, a prefix holding {wanted_names}, or a glob)")
    listed = sorted({_uri(scheme, f.path): f for f in found}.items())
    if any(f.tag is None for _, f in listed):
        return [u for u, _ in listed], None
    return [u for u, _ in listed], [[f.size, f.tag] for _, f in listed]


def object_identity(uri: str) -> list[object]:
    """What identifies a remote file's content wherever it lies, as `[size, digest]` does a local file's: its size
    and its ETag or checksum (the Hub's LFS sha256 or git blob id); the path alone if it cannot be reached."""
    fs, path = locate(uri)
    try:
        if uri.startswith("hf://"):
            info = retrying(uri, lambda: fs.handler.fs.info(path))
            lfs = info.get("lfs") or {}
            return [info.get("size"), lfs.get("sha256") or info.get("blob_id")]

        def head() -> list[object]:
            with fs.open_input_file(path) as f:
                tag = _tag(f.metadata())
                if tag is None:  # a store that gives no checksum: its modification time instead
                    tag = str(fs.get_file_info(path).mtime_ns)
                return [f.size(), tag]
        return retrying(uri, head)
    except OSError:
        return [uri]


def remote_identity(paths: list[str]) -> list[object] | None:
    """The identity of a source's remote files (None if they are local: the source's own identity applies)."""
    return object_identities(paths) if any(is_remote(p) for p in paths) else None


def object_identities(uris: list[str]) -> list[object]:
    """object_identity of many files, a few requests at a time."""
    if len(uris) <= 1:
        return [object_identity(u) for u in uris]
    with ThreadPoolExecutor(min(IDENTITY_WORKERS, len(uris)), thread_name_prefix="identity") as pool:
        return list(pool.map(object_identity, uris))
