"""What a source's data is, independent of where it lies: a local file's identity is its size and a digest of its
bytes (never its path or mtime), so data copied to another path or volume, or touched, keeps its token store and
every cursor, while a change of content makes a new one.

Hashing every byte at every start would cost a read of the whole corpus, so digests are remembered in a small
sidecar file (`file-digests.json` in the cache folder) keyed by the file's resolved path, size, mtime, inode and
change time (ctime: set by the kernel on every write, and not settable, so a rewrite whose mtime was put back, by
`touch -r` or a copy that keeps times, is still seen): a file none of these changed for is not read again. A remote
object's identity (its ETag or checksum) belongs beside `local_file_identity`, one small function per kind of
source.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import xxhash

from ...paths import cache_home

log = logging.getLogger(__name__)

DIGESTS_FILE = "file-digests.json"
READ_BYTES = 8 << 20
FileIdentity = list[object]
"""A file's content identity as JSON: `[size, digest]`."""


def file_digest(path: str) -> str:
    """xxh3-128 of a file's bytes, read in chunks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class DigestCache:
    """Digests of local files by (resolved path, size, mtime, inode, device, ctime), kept in a JSON file that any
    process may rewrite (each write is whole: a temporary file renamed; a lost update, or an entry that is not
    of this form, only costs a hash again)."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._lock = threading.Lock()
        self._entries: dict[str, list[object]] | None = None
        self.hashed = 0  # files read for their digest by this process (the rest came from the sidecar)

    def _load(self) -> dict[str, list[object]]:
        if self._entries is None:
            try:
                data = json.loads(self.file.read_text())
                self._entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def identities(self, paths: list[str]) -> list[FileIdentity]:
        """Each file's `[size, digest]` (`[path]` for one that cannot be read); the sidecar is written once, if any
        file had to be hashed."""
        out, hashed = [], False
        for path in paths:
            try:
                identity, new = self._identity(path)
            except OSError:
                identity, new = [path], False
            out.append(identity)
            hashed = hashed or new
        if hashed:
            with self._lock:
                self._save(self._load())
        return out

    def _identity(self, path: str) -> tuple[FileIdentity, bool]:
        """The file's `[size, digest]`, and whether it was hashed now; OSError if it cannot be read."""
        real = os.path.realpath(path)
        stat = os.stat(real)
        key: list[object] = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns]
        with self._lock:
            known = self._load().get(real)
        if isinstance(known, list) and len(known) == len(key) + 1 and known[:-1] == key \
                and isinstance(known[-1], str):
            return [stat.st_size, known[-1]], False
        digest = file_digest(real)
        with self._lock:
            self.hashed += 1
            self._load()[real] = [*key, digest]
        return [stat.st_size, digest], True

    def _save(self, entries: dict[str, list[object]]) -> None:
        """Write the sidecar whole (entries of files that no longer exist are dropped); a failure only warns."""
        kept = {path: entry for path, entry in entries.items() if os.path.exists(path)}
        temp = self.file.with_name(f".{self.file.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps(kept))
            os.replace(temp, self.file)
        except OSError as err:
            log.warning("cannot remember file digests in %s (%s): files are hashed again at the next start",
                        self.file, err)
            temp.unlink(missing_ok=True)


_caches: dict[Path, DigestCache] = {}
_caches_lock = threading.Lock()


def digest_cache() -> DigestCache:
    """This process's digest cache for the current cache folder."""
    file = cache_home() / DIGESTS_FILE
    with _caches_lock:
        return _caches.setdefault(file, DigestCache(file))


def local_file_identities(paths: list[str]) -> list[FileIdentity]:
    """Local files' content identities: `[size, xxh3-128 of the bytes]` each (from the digest sidecar when a file is
    unchanged); `[path]` for one that cannot be read (reading it then reports the error where it belongs)."""
    return digest_cache().identities(paths)
