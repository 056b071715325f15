"""A job's sidecars agree on each epoch's membership: records in the shared token store, written once.

Each sidecar of a multi-node job looks at the sources when an epoch opens there (membership.py); files that land near
an epoch boundary could give two sidecars different files for one epoch, and the job's global rows would no longer
be one sequence. So when the client names its run (`Open.run_id`), the first sidecar to open epoch e of that run
writes `<cache_dir>/runs/<run>/<dataset>/epoch-<e>.json` (the membership's content fingerprint, its files and their
identities) with an exclusive create (locally a hard link, on S3 a conditional put: store/lease.py's slots), and every
other sidecar, and this one again after a restart, serves what that record says. `<dataset>` is a hash of the
dataset's name, its cursor fingerprint and its source list, so another configuration never reads these records.
A sidecar records a membership once it has readied it (cached mode: its store committed), so a record never names
files no sidecar could serve; one that opened the epoch meanwhile over other files takes the record all the same
(what it built serves a later epoch, or donates its shards).

A record that cannot be read as one (not JSON, another schema, a fingerprint that does not match its identities) is
logged and replaced by a compare-and-swap on the version read, so of sidecars that find it damaged one writes and the
others take what it wrote. A run keeps the records of its KEPT_EPOCHS latest epochs; a run none of whose records was
written for IDLE_RUN_S is deleted (looked for once per server, at its first record).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from ..errors import Unavailable
from ..store.fs import StoreFS
from ..store.lease import Slot, has_lease, slot
from .membership import Membership

log = logging.getLogger(__name__)

RUNS = "runs"
RECORD_VERSION: Literal[1] = 1
KEPT_EPOCHS = 16  # epoch records kept per run and dataset (a record older than that is never asked for again)
IDLE_RUN_S = 14 * 86400.0  # a run whose records are all older than this is over: its records are deleted
ATTEMPTS = 4  # reads and writes of one record before giving up (each lost race means another sidecar wrote)
MAX_RUN_ID = 256

Make = Callable[[list[list[str]], list[list[object]]], Membership]
"""Files and their identities per source as a membership, named by their content fingerprint (served.py)."""


class RunRecord(BaseModel):
    """An epoch's membership as the run's first sidecar to open the epoch fixed it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    version: Literal[1]
    run: Annotated[str, Field(min_length=1, max_length=MAX_RUN_ID)]
    dataset: str
    epoch: Annotated[StrictInt, Field(ge=0)]
    members: Annotated[str, Field(min_length=1, max_length=64)]
    files: list[list[str]]
    identities: list[list[Any]]
    by: str  # HOST/PID of the sidecar that wrote it
    created: float


def run_folder(run: str) -> str:
    """A run id as a folder name: its printable part, then a hash of the whole (ids differing only in other
    characters stay apart)."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", run)[:64]
    return f"{slug}-{hashlib.sha256(run.encode()).hexdigest()[:8]}"


def run_members(fs: StoreFS, *, dataset: str, key: str, sources: int, make: Make) -> RunMembers | None:
    """The run records of a dataset at its store location, or None (logged) where that location cannot hold them:
    records need an exclusive create, which a local folder and `s3://` (with boto3) have."""
    location = fs.uri(fs.root)
    scheme = urlparse(location).scheme
    if has_lease(location) and (scheme != "s3" or importlib.util.find_spec("boto3") is not None):
        return RunMembers(fs, dataset=dataset, key=key, sources=sources, make=make)
    log.info("dataset %s: %s cannot hold run records (a local folder, or s3:// with boto3, can): each sidecar fixes "
             "an epoch's files for itself, even for streams that name their run", dataset, location)
    return None


class RunMembers:
    """The records of one dataset's epochs, per run, under a store location (`fs`'s root)."""

    def __init__(self, fs: StoreFS, *, dataset: str, key: str, sources: int, make: Make) -> None:
        self.fs, self.dataset, self.key, self.sources, self.make = fs, dataset, key, sources, make
        self.location = fs.uri(fs.root)
        self._pruned_idle = False
        self._lock = threading.Lock()

    def _name(self, run: str, epoch: int | None = None) -> str:
        folder = f"{RUNS}/{run_folder(run)}/{self.key}"
        return folder if epoch is None else f"{folder}/epoch-{epoch:08d}.json"

    def _slot(self, run: str, epoch: int) -> Slot:
        return slot(self.location, self._name(run, epoch))

    def agreed(self, run: str, epoch: int) -> Membership | None:
        """The membership the run's record fixes for `epoch`, or None if none is written yet (or it is damaged:
        `claim` replaces it)."""
        with _storage(f"read the run's record of epoch {epoch}"):
            record = self._slot(run, epoch).read()
        return None if record is None else self._parse(record.data, run, epoch)[0]

    def claim(self, run: str, epoch: int, ours: Membership) -> Membership:
        """Record `ours` as the run's membership of `epoch` unless a record exists: the membership recorded, ours
        if this sidecar wrote it first."""
        where = self._slot(run, epoch)
        data = RunRecord(version=RECORD_VERSION, run=run, dataset=self.dataset, epoch=epoch, members=ours.fingerprint,
                         files=ours.files, identities=ours.identities, by=f"{socket.gethostname()}/{os.getpid()}",
                         created=time.time()).model_dump_json().encode()
        with _storage(f"write the run's record of epoch {epoch}"):
            for _ in range(ATTEMPTS):
                if where.create(data) is not None:
                    log.info("dataset %s, run %s: epoch %d serves content %s (%s files per source), recorded in %s "
                             "for the run's other sidecars", self.dataset, run, epoch, ours.fingerprint, ours.counts,
                             where.where)
                    self._prune(run, epoch)
                    return ours
                record = where.read()
                if record is None:  # deleted between our create and our read (pruned): try again
                    continue
                recorded, problem = self._parse(record.data, run, epoch)
                if recorded is not None:
                    return recorded
                log.warning("dataset %s, run %s: the record of epoch %d at %s is damaged (%s): replacing it with "
                            "this sidecar's membership", self.dataset, run, epoch, where.where, problem)
                if where.replace(data, record.version) is not None:
                    return ours
        raise Unavailable(f"dataset {self.dataset}, run {run}: the record of epoch {epoch} at {where.where} kept "
                          f"changing under this sidecar ({ATTEMPTS} reads and writes); retrying")

    def _parse(self, data: bytes, run: str, epoch: int) -> tuple[Membership | None, str]:
        """The record's membership, or None and what is wrong with it."""
        try:
            record = RunRecord.model_validate(json.loads(data))
        except (ValueError, ValidationError) as err:
            return None, "not a run record: " + " ".join(line.strip() for line in str(err).splitlines()[:3])
        if (record.run, record.dataset, record.epoch) != (run, self.dataset, epoch):
            return None, f"it names run {record.run!r}, dataset {record.dataset!r}, epoch {record.epoch}"
        if len(record.files) != self.sources or len(record.identities) != self.sources:
            return None, f"it has {len(record.files)} sources, the dataset {self.sources}"
        membership = self.make(record.files, record.identities)
        if membership.fingerprint != record.members:
            return None, f"its files' content is {membership.fingerprint}, not the {record.members} it names"
        return membership, ""

    def _prune(self, run: str, epoch: int) -> None:
        """Delete the run's records of epochs KEPT_EPOCHS before `epoch`, and (once per server) idle runs'."""
        try:
            for info in self.fs.listdir(self.fs.path(self._name(run))):
                match = re.fullmatch(r"epoch-(\d+)\.json(\.lock)?", info.base_name)
                if match and int(match.group(1)) <= epoch - KEPT_EPOCHS:
                    self.fs.delete(info.path)
            with self._lock:
                idle, self._pruned_idle = not self._pruned_idle, True
            if idle:
                self._prune_idle_runs(time.time() - IDLE_RUN_S)
        except OSError as err:  # pruning is housekeeping: the next record tries again
            log.warning("dataset %s: cannot prune old run records under %s: %s", self.dataset, self.location, err)

    def _prune_idle_runs(self, before: float) -> None:
        """Delete this dataset's records of runs none of whose records was written since `before`."""
        newest: dict[str, float] = {}
        for run in self.fs.listdir(self.fs.path(RUNS)):
            folder = f"{run.path}/{self.key}"
            for info in self.fs.listdir(folder):
                if info.type == pafs.FileType.File and info.mtime is not None:
                    newest[folder] = max(newest.get(folder, 0.0), info.mtime.timestamp())
        for folder, written in newest.items():
            if written < before:
                log.info("dataset %s: deleting the records of run folder %s (idle for %.0f days)", self.dataset,
                         folder, (time.time() - written) / 86400)
                self.fs.fs.delete_dir(folder)
                run = folder.rsplit("/", 1)[0]
                if self.fs.is_local and not self.fs.listdir(run):  # no other dataset's records: the run is gone
                    self.fs.fs.delete_dir(run)


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What reading or writing a record raises when the storage fails: OSError, and boto3's errors on S3."""
    if importlib.util.find_spec("botocore") is None:
        return (OSError,)
    from botocore.exceptions import BotoCoreError, ClientError

    return OSError, BotoCoreError, ClientError


@contextlib.contextmanager
def _storage(doing: str) -> Iterator[None]:
    """Storage errors while reading or writing a record: UNAVAILABLE (the client resumes when it answers again)."""
    try:
        yield
    except _storage_errors() as err:
        raise Unavailable(f"cannot {doing}: {err}") from err


def localize(recorded: Membership, here: Membership) -> tuple[Membership, list[str]]:
    """A recorded membership over the files this sidecar sees (its paths may differ: a file is its content): each
    recorded file is taken at the path of a file of the same identity here, else at the recorded path, which is then
    listed as missing. A source whose identities are not one per file (a Hub dataset) keeps the recorded ones."""
    files, missing = [], []
    for recorded_files, identities, here_files, here_ids in zip(recorded.files, recorded.identities, here.files,
                                                                 here.identities, strict=True):
        if identities == here_ids:
            files.append(list(here_files))
            continue
        if len(identities) != len(recorded_files) or len(here_ids) != len(here_files):
            files.append(list(recorded_files))
            continue
        paths: dict[str, list[str]] = {}
        for path, identity in zip(here_files, here_ids, strict=True):
            paths.setdefault(json.dumps(identity), []).append(path)
        taken = []
        for path, identity in zip(recorded_files, identities, strict=True):
            same = paths.get(json.dumps(identity))
            if same:
                taken.append(same.pop(0))
            else:
                taken.append(path)
                missing.append(path)
        files.append(taken)
    return Membership(recorded.fingerprint, files, recorded.identities), missing


def dataset_key(*parts: str) -> str:
    """The records' folder of one dataset configuration."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
