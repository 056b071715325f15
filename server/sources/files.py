"""Turn a source PATH (file, directory or glob) into a sorted list of files, or fail naming what was tried."""

from __future__ import annotations

import glob
from pathlib import Path

from ..errors import SourceError

GLOB_CHARS = "*?["


def _candidates(path: str, base_dir: Path) -> list[Path]:
    """Where a PATH may live: itself if absolute, else under the current directory, then under base_dir."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return [given]
    return list(dict.fromkeys([Path.cwd() / given, base_dir / given]))


def _files_in(directory: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The files directly inside a directory whose names end with one of the suffixes."""
    return [str(p) for p in directory.iterdir() if p.name.endswith(suffixes) and p.is_file()]


def _expand_one(candidate: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The files one candidate names: a file, a directory's matching files, or a glob's matches."""
    if candidate.is_file():
        return [str(candidate)]
    if candidate.is_dir():
        return _files_in(candidate, suffixes)
    if not any(c in str(candidate) for c in GLOB_CHARS):
        return []
    found: list[str] = []
    for match in map(Path, glob.glob(str(candidate), recursive=True)):
        found.extend(_files_in(match, suffixes) if match.is_dir() else [str(match)])
    return found


def expand_paths(spec: str, path: str, suffixes: tuple[str, ...], *, base_dir: Path) -> list[str]:
    """The sorted files PATH names, tried under the current directory first, then base_dir."""
    if not path:
        raise SourceError(f"{spec}: no path given")
    tried = _candidates(path, base_dir)
    for candidate in tried:
        found = _expand_one(candidate, suffixes)
        if found:
            return sorted(set(found))
    wanted = ", ".join(f"*{s}" for s in suffixes)
    raise SourceError(f"{spec}: no files found (a file, a directory holding {wanted}, or a glob); "
                      f"tried {', '.join(str(c) for c in tried)}")
