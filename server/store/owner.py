"""Who writes in a store location, whether they are still at work, and the reclaiming of what writers that are
gone left behind.

An `Owner` names one process's work (host, machine, pid, process start time, random token): the build lease's
record names its holder (lease.py, renewed every HEARTBEAT_S) and a manifest its builder (`built_by`).
`owner_alive` says whether an owner may still be at work:
- same machine (same kernel boot and PID namespace, so the PID is meaningful here): the PID runs, and is the
  process that started at that time (not a reused PID);
- another machine: its heartbeat is younger than STALE_AFTER_S;
- no owner record: the path's mtime, its heartbeat, is younger than STALE_AFTER_S.
A builder writes each file of a store in place under a temporary name (`temp_name`:
`.<file>.tmp-<host>-<pid>-<token>`, see fs.py) and renames it into place; such a file has no owner record: its
mtime, fresh while it is written, is its heartbeat, and it is stale at once when its name says it was written by
a process of this host that is no longer running. Temporary folders `.<fingerprint>.tmp-...` holding an
`owner.json` record were left by builders of older versions, which built a whole store in one. A folder
`.<name>.del-<token>` is being removed (`discard`) and is always stale. `temp_folders` lists them all, and
`reclaim` removes the stale ones (at every start, and by `sigil-feed cache rm`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

OWNER = "owner.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
TEMP_MARK, DELETE_MARK = ".tmp-", ".del-"


@dataclass(frozen=True)
class Owner:
    """A builder: which process on which machine, and a token unique to this build."""

    host: str  # for people: the hostname (the pod's name in k8s)
    machine: str  # for liveness: kernel boot id and PID namespace; PIDs compare only within one
    pid: int
    started: int  # the process's start time in clock ticks since boot (0 where unknown)
    token: str

    @property
    def label(self) -> str:
        """HOST/PID, as logs and `cache ls` show it."""
        return f"{self.host}/{self.pid}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@cache
def this_machine() -> str:
    """This kernel boot and PID namespace (just the hostname where /proc is missing)."""
    boot, pid_ns = _read("/proc/sys/kernel/random/boot_id"), ""
    with contextlib.suppress(OSError):
        pid_ns = os.readlink("/proc/self/ns/pid")
    return f"{socket.gethostname()}:{boot}:{pid_ns}"


def process_started(pid: int) -> int | None:
    """The start time of a running process (0 where the platform does not say), None if it is not running."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return None if fields[0] in ("Z", "X") else int(fields[19])
    if os.path.isdir("/proc/self"):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def new_owner() -> Owner:
    """An owner for a new build by this process."""
    pid = os.getpid()
    return Owner(host=socket.gethostname(), machine=this_machine(), pid=pid, started=process_started(pid) or 0,
                 token=secrets.token_hex(4))


def temp_name(fingerprint: str, owner: Owner) -> str:
    """A temporary folder's name, unique per host, process and build."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", owner.host)[:48]
    return f".{fingerprint}{TEMP_MARK}{host}-{owner.pid}-{owner.token}"


def owner_alive(owner: Owner | None, heartbeat_age: float, *, machine: str, ttl_s: float = STALE_AFTER_S) -> bool:
    """Whether a temporary folder's (or a build lease's) owner may still be at work (see the module's rules)."""
    if owner is None or owner.machine != machine:
        return heartbeat_age < ttl_s
    return process_started(owner.pid) == owner.started


@dataclass(frozen=True)
class TempFolder:
    """A temporary folder in a cache folder, with what is known of its owner."""

    path: Path
    fingerprint: str
    owner: Owner | None
    heartbeat_age: float
    alive: bool

    def describe(self) -> str:
        """`building by HOST/PID` or `stale (...)`, for logs and `cache ls`."""
        if DELETE_MARK in self.path.name:
            return "stale: a removal that did not finish"
        who = self.owner.label if self.owner else "an unknown builder"
        age = f"heartbeat {self.heartbeat_age:.0f} s ago"
        return f"building by {who} ({age})" if self.alive else f"stale: left by {who}, which is gone ({age})"


def _owner(folder: Path) -> tuple[Owner | None, float]:
    """The folder's owner record (None if absent or unreadable) and its heartbeat's age."""
    now = time.time()
    try:
        record = folder / OWNER
        age = now - record.stat().st_mtime
        return Owner(**json.loads(record.read_text())), age
    except (OSError, ValueError, TypeError):
        try:
            return None, now - folder.stat().st_mtime
        except OSError:
            return None, float("inf")


def _writer_gone(name: str) -> bool:
    """Whether a temporary file's writer, named in it (`...tmp-<host>-<pid>-<token>`), was a process of this host
    that is no longer running (a PID that runs again may be another process: then it counts as alive)."""
    match = re.fullmatch(r".*" + re.escape(TEMP_MARK) + r"(.+)-(\d+)-[0-9a-f]+", name)
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:48]
    return match is not None and match.group(1) == host and process_started(int(match.group(2))) is None


def temp_folders(cache_dir: Path) -> list[TempFolder]:
    """Every temporary folder or file under cache_dir (builds under way, or left behind)."""
    machine = this_machine()
    found = []
    for path in sorted(cache_dir.glob(".*")):
        fingerprint = path.name[1:].split(".")[0]
        if DELETE_MARK in path.name and path.is_dir():
            found.append(TempFolder(path, fingerprint, None, float("inf"), alive=False))
        elif TEMP_MARK in path.name and path.is_dir():
            owner, age = _owner(path)
            found.append(TempFolder(path, fingerprint, owner, age, owner_alive(owner, age, machine=machine)))
        elif TEMP_MARK in path.name and path.is_file():
            _, age = _owner(path)
            alive = owner_alive(None, age, machine=machine) and not _writer_gone(path.name)
            found.append(TempFolder(path, fingerprint, None, age, alive))
    return found


def folder_bytes(path: Path) -> int:
    """Bytes of the files directly in a folder (a temporary folder is flat), or of a file."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for file in path.iterdir() if path.is_dir() else ():
        with contextlib.suppress(OSError):
            total += file.stat().st_size
    return total


def reclaim(cache_dir: Path, fingerprint: str | None = None) -> list[TempFolder]:
    """Remove the stale temporary folders (of one fingerprint, or all); returns what was removed."""
    if not cache_dir.is_dir():
        return []
    removed = []
    for temp in temp_folders(cache_dir):
        if temp.alive or fingerprint not in (None, temp.fingerprint):
            continue
        size = folder_bytes(temp.path)
        if temp.path.is_dir():
            shutil.rmtree(temp.path, ignore_errors=True)
        else:
            temp.path.unlink(missing_ok=True)
        log.warning("reclaimed %s (%d bytes): %s", temp.path, size, temp.describe())
        removed.append(temp)
    return removed


def discard(path: Path) -> None:
    """Remove a folder so that nobody ever sees it half-removed: rename it aside, then delete it."""
    aside = path.with_name(f".{path.name.lstrip('.')}{DELETE_MARK}{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)
