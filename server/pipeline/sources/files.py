"""Turn a source PATH (file, directory or glob) into a sorted list of files, or fail naming what was tried.

A glob is matched like `glob.glob(recursive=True)`, but folder links are entered only when they lead out of
the listed tree and each real folder once, and each real file is listed once: a link loop (`ln -s . dir/self`)
neither repeats data nor recurses.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

from ...errors import SourceError

log = logging.getLogger(__name__)

GLOB_CHARS = "*?["
Parts = tuple[str, ...]
_reported: set[str] = set()  # links already logged as skipped (each once per process)


def _candidates(path: str, base_dir: Path) -> list[Path]:
    """Where a PATH may live: itself if absolute, else under the current directory, then under base_dir."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return [given]
    return list(dict.fromkeys([Path.cwd() / given, base_dir / given]))


def _files_in(directory: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The files directly inside a directory whose names end with one of the suffixes."""
    return [str(p) for p in directory.iterdir() if p.name.endswith(suffixes) and p.is_file()]


def _skip(spec: str, link: Path, why: str) -> None:
    """Log a link that is not followed, once per process."""
    if str(link) not in _reported:
        _reported.add(str(link))
        log.warning("%s: skipping link %s -> %s (%s)", spec, link, os.path.realpath(link), why)


def _name_matches(name: str, pattern: str) -> bool:
    """One path component against one glob component; hidden names only match a pattern that starts with '.'."""
    return (pattern.startswith(".") or not name.startswith(".")) and fnmatchcase(name, pattern)


def _matches(parts: Parts, pattern: Parts) -> bool:
    """Whether a path's components match the glob's (`**`: any number of non-hidden folders)."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(parts[i:], rest) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return bool(parts) and _name_matches(parts[0], head) and _matches(parts[1:], rest)


def _leads_to(parts: Parts, pattern: Parts) -> bool:
    """Whether a folder's components may begin a path that matches the glob (so the walk enters it)."""
    for i, part in enumerate(parts):
        if i >= len(pattern):
            return False
        if pattern[i] == "**":
            return not any(p.startswith(".") for p in parts[i:])
        if not _name_matches(part, pattern[i]):
            return False
    return True


def _broken_link(entry: os.DirEntry[str]) -> str | None:
    """Why a link cannot be followed (a loop of links, or a target that does not exist); None for the rest."""
    if not entry.is_symlink():
        return None
    try:
        os.stat(entry.path)
    except OSError as err:
        return "a loop of links" if err.errno == errno.ELOOP else f"it cannot be followed: {err.strerror}"
    return None


def _walk(spec: str, root: Path, wanted: Parts) -> Iterator[Path]:
    """The paths under root that match the glob's components; each real folder is listed or entered once,
    and never through a link that leads back into the tree (such links are left out and logged)."""
    real_root = Path(os.path.realpath(root))
    seen = {real_root}
    if _matches((), wanted):
        yield root
    queue: deque[tuple[Path, Parts]] = deque([(root, ())])  # breadth first, by name: the first link wins
    while queue:
        folder, parts = queue.popleft()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            path, sub = Path(entry.path), (*parts, entry.name)
            matched = _matches(sub, wanted)
            if not (matched or _leads_to(sub, wanted)):
                continue
            broken = _broken_link(entry)
            if broken:
                _skip(spec, path, broken)
                continue
            if entry.is_dir():
                enter = _leads_to(sub, wanted)
                if not (matched or enter):
                    continue
                real = Path(os.path.realpath(path))
                if entry.is_symlink() and real.is_relative_to(real_root):
                    _skip(spec, path, "it leads back into the listed tree")
                    continue
                if real in seen:
                    _skip(spec, path, "its folder is already listed")
                    continue
                seen.add(real)
                if enter:
                    queue.append((path, sub))
            if matched:
                yield path


def _glob(spec: str, pattern: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The files a glob names: matching files, and the matching files of matching folders."""
    parts = pattern.parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    root, wanted = Path(*parts[:fixed]), parts[fixed:]
    if not root.is_dir():
        return []
    found: list[str] = []
    for path in _walk(spec, root, wanted):
        found.extend(_files_in(path, suffixes) if path.is_dir() else [str(path)])
    return found


def _expand_one(spec: str, candidate: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The files one candidate names: a file, a directory's matching files, or a glob's matches."""
    if candidate.is_file():
        return [str(candidate)]
    if candidate.is_dir():
        return _files_in(candidate, suffixes)
    if not any(c in str(candidate) for c in GLOB_CHARS):
        return []
    return _glob(spec, candidate, suffixes)


def _once(spec: str, files: list[str]) -> list[str]:
    """Sorted files, each real file once (the first name in sorted order is kept; other links are logged)."""
    kept: dict[str, str] = {}
    for path in sorted(set(files)):
        real = os.path.realpath(path)
        if real in kept:
            _skip(spec, Path(path), f"the same file as {kept[real]}")
        else:
            kept[real] = path
    return list(kept.values())


def expand_paths(spec: str, path: str, suffixes: tuple[str, ...], *, base_dir: Path) -> list[str]:
    """The sorted files PATH names, tried under the current directory first, then base_dir."""
    if not path:
        raise SourceError(f"{spec}: no path given")
    tried = _candidates(path, base_dir)
    for candidate in tried:
        found = _expand_one(spec, candidate, suffixes)
        if found:
            return _once(spec, found)
    wanted = ", ".join(f"*{s}" for s in suffixes)
    raise SourceError(f"{spec}: no files found (a file, a directory holding {wanted}, or a glob); "
                      f"tried {', '.join(str(c) for c in tried)}")
