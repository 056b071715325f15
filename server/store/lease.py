"""One builder per store location: a lease object `<location>/.lease`, created exclusively, kept fresh by a
heartbeat while its holder builds, and taken over, race-free, when the holder is gone.

Locations: a local path (or `file://` URI), where the lease is a file created whole by a hard link from a
temporary file (which fails if the lease exists); or
`s3://bucket/prefix`, where it is an object created by a conditional put (`If-None-Match: *`) through boto3
(pyarrow's filesystems cannot make conditional requests; boto3 comes with the `s3` extra). The S3 client reads
the standard environment: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` (or
`AWS_DEFAULT_REGION`).
Other schemes (`gs://`, ...) have no lease: `ConfigError`.

The lease holds the holder (`owner.Owner`: host, machine, pid, process start time, random token) and the
wall-clock times it was acquired and last renewed. Its holder is gone, and the lease may be taken over, by
server/store/owner.py's rules:
- same machine (same kernel boot and PID namespace): the PID is not running, or is another process;
- another machine, or a record that cannot be read: the last heartbeat is older than `ttl_s` (clocks are
  assumed to agree to well within `ttl_s`, as NTP keeps them). A heartbeat dated in the future (the holder's
  clock runs ahead, or the record is forged) is aged by the storage's own clock instead: the time since the
  record was last written (file mtime, object LastModified), so it can never block builders forever.

Every change after the creation is a compare-and-swap on the record's version (the object's ETag on S3;
locally the record's xxh3, compared and replaced under an `flock` on `<location>/.lease.lock`, which the
kernel drops when its process dies): a takeover replaces the stale record it read, a renewal replaces the
record it wrote last, a release deletes it. So of two waiters taking over the same stale lease exactly one
wins, and a holder that was taken over (it stalled past `ttl_s`) learns it at its next renewal: the lease
is then `lost` and `check()` raises `LeaseLost`. A builder calls `check()` before committing; a lost lease
costs duplicate work, never a wrong store, since the manifest is the commit point and shard names are
deterministic (each shard written whole). The same holds on an S3-compatible server that ignores conditional
requests (AWS S3 and moto >= 5 honour them): there two builders may both build.

The same slots, named otherwise (`slot(location, name)`), hold other records written once: a run's record of an
epoch's files (feed/run_members.py).

Use: `wait_or_build(location, build, ready)` returns once `ready()` (the manifest exists and is valid),
calling `build(lease)` itself when it wins the lease and reporting the holder through `on_wait` while another
process builds (`HolderInfo.describe()`: "waiting for build by HOST/PID"). Lower level: `Lease.try_acquire`,
`renew`, `release` (or `with lease:`), and `holder(location)`.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import importlib.util
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlparse

import xxhash

from ..errors import ConfigError, FeedError
from .owner import HEARTBEAT_S, STALE_AFTER_S, Owner, new_owner, owner_alive, this_machine

log = logging.getLogger(__name__)

LEASE = ".lease"
POLL_S = 2.0


class LeaseLost(FeedError):
    """This process held a build lease, and another took it over (this one stalled past the TTL)."""


class Record(NamedTuple):
    """The lease as stored: its bytes, its version (for compare-and-swap) and when it was last written."""

    data: bytes
    version: str
    modified: float


class Slot(Protocol):
    """Where a lease lives, with the four atomic operations it needs."""

    where: str

    def create(self, data: bytes) -> str | None:
        """Write the lease if none exists; its version, or None if one exists."""

    def read(self) -> Record | None:
        """The lease, or None if there is none."""

    def replace(self, data: bytes, version: str) -> str | None:
        """Overwrite the lease if it is still at `version`; the new version, or None if it is not."""

    def delete(self, version: str) -> bool:
        """Remove the lease if it is still at `version`."""


_LOCAL_CAS = threading.Lock()  # flock is per open file, this makes the compare-and-swap safe between threads too


class LocalSlot:
    """A lease file (or another record, `name`): created whole by a hard link; replaced (temporary file + rename)
    or deleted under an flock."""

    def __init__(self, folder: Path, name: str = LEASE) -> None:
        self.name, self.path, self.lock_path = name, folder / name, folder / f"{name}.lock"
        self.where = str(self.path)

    def create(self, data: bytes) -> str | None:
        """Put the record in place whole (a reader never sees a half-written lease), unless one exists."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(f"{self.name}.tmp-{secrets.token_hex(4)}")
        try:
            temp.write_bytes(data)
            os.link(temp, self.path)  # fails if the lease exists: an exclusive create of a complete file
        except FileExistsError:
            return None
        finally:
            temp.unlink(missing_ok=True)
        return xxhash.xxh3_64_hexdigest(data)

    def read(self) -> Record | None:
        try:
            with self.path.open("rb") as f:
                data = f.read()
                modified = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Record(data, xxhash.xxh3_64_hexdigest(data), modified)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Record | None]:
        with _LOCAL_CAS, self.lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield self.read()

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked() as current:
            if current is None or current.version != version:
                return None
            temp = self.path.with_name(f"{self.name}.tmp-{secrets.token_hex(4)}")
            try:
                temp.write_bytes(data)
                os.replace(temp, self.path)
            finally:
                temp.unlink(missing_ok=True)
            return xxhash.xxh3_64_hexdigest(data)

    def delete(self, version: str) -> bool:
        with self._locked() as current:
            if current is None or current.version != version:
                return False
            self.path.unlink()
            return True


_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409"}


@cache
def _s3_client(endpoint: str | None, region: str | None, key_id: str | None) -> Any:
    """One thread-safe boto3 S3 client per environment (key_id only tells environments apart: boto3 reads the
    credentials from the environment itself)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=region)


class S3Slot:
    """A lease object: conditional PutObject (If-None-Match, If-Match) and DeleteObject (If-Match)."""

    def __init__(self, bucket: str, key: str) -> None:
        self.client = _s3_client(os.environ.get("AWS_ENDPOINT_URL"),
                                 os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                                 os.environ.get("AWS_ACCESS_KEY_ID"))
        self.bucket, self.key, self.where = bucket, key, f"s3://{bucket}/{key}"

    def _conditional(self, call: Callable[..., Any], **kwargs: Any) -> Any:
        """The call's response, or None if its condition failed (another process changed the lease)."""
        from botocore.exceptions import ClientError

        try:
            return call(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in _LOST_RACE:
                return None
            raise

    def create(self, data: bytes) -> str | None:
        response = self._conditional(self.client.put_object, Body=data, IfNoneMatch="*")
        return None if response is None else str(response["ETag"])

    def read(self) -> Record | None:
        response = self._conditional(self.client.get_object)
        if response is None:
            return None
        return Record(response["Body"].read(), str(response["ETag"]), response["LastModified"].timestamp())

    def replace(self, data: bytes, version: str) -> str | None:
        response = self._conditional(self.client.put_object, Body=data, IfMatch=version)
        return None if response is None else str(response["ETag"])

    def delete(self, version: str) -> bool:
        return self._conditional(self.client.delete_object, IfMatch=version) is not None


def has_lease(location: str) -> bool:
    """Whether builders at a store location can elect one: a local path, `file://...` or `s3://...`."""
    scheme = urlparse(location).scheme
    return scheme in ("", "file", "s3") or len(scheme) == 1


def slot(location: str, name: str = LEASE) -> Slot:
    """The lease slot of a store location (a local path, `file://...` or `s3://bucket/prefix`), or the slot of
    another record `name` (a path under the location) with the same atomic operations."""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # a Windows drive letter is a path
        path = Path(parsed.path if parsed.scheme == "file" else location) / name
        return LocalSlot(path.parent, path.name)
    if parsed.scheme == "s3":
        if importlib.util.find_spec("boto3") is None:
            raise ConfigError(f"the build lease on s3:// locations needs boto3, which is not installed: {location}",
                              key="dataset.cache_dir", fix="pip install 'sigil-feed[s3]'")
        prefix = parsed.path.strip("/")
        return S3Slot(parsed.netloc, f"{prefix}/{name}" if prefix else name)
    raise ConfigError(f"no build lease on {parsed.scheme}:// locations (a local path or s3:// only): {location}",
                      key="dataset.cache_dir", fix="build the store beforehand with `sigil-feed cache build`")


def _encode(owner: Owner, acquired: float, renewed: float) -> bytes:
    return json.dumps({**asdict(owner), "acquired": acquired, "renewed": renewed}).encode()


@dataclass(frozen=True)
class HolderInfo:
    """Who holds a lease, when it last renewed it, and whether it may still be building."""

    owner: Owner | None  # None: a record that cannot be read (being written, or torn)
    acquired: float
    renewed: float  # the holder's clock; for an unreadable record, when it was last written
    age: float  # seconds since `renewed`, by this machine's clock
    alive: bool

    @property
    def label(self) -> str:
        """HOST/PID, or `an unknown builder`."""
        return self.owner.label if self.owner else "an unknown builder"

    def describe(self) -> str:
        """`waiting for build by HOST/PID (heartbeat N s ago)`, for GetStats, health and logs."""
        return f"waiting for build by {self.label} (heartbeat {self.age:.0f} s ago)"


def _holder(record: Record, ttl_s: float) -> HolderInfo:
    """What a lease record says, judged by the module's rules."""
    now = time.time()
    try:
        fields = json.loads(record.data)
        acquired, renewed = float(fields.pop("acquired")), float(fields.pop("renewed"))
        owner: Owner | None = Owner(**fields)
    except (ValueError, TypeError, KeyError, AttributeError):
        owner, acquired, renewed = None, record.modified, record.modified
    age = now - renewed
    if age < 0:  # a heartbeat from the future (a clock ahead, or a forged record): the storage's clock decides
        age = max(0.0, now - record.modified)
    return HolderInfo(owner, acquired, renewed, age, owner_alive(owner, age, machine=this_machine(), ttl_s=ttl_s))


def holder(location: str, *, ttl_s: float = STALE_AFTER_S) -> HolderInfo | None:
    """Who holds the build lease of a store location, or None if nobody does."""
    record = slot(location).read()
    return None if record is None else _holder(record, ttl_s)


class Lease:
    """A build lease held by this process, renewed by a heartbeat thread until released (or lost)."""

    def __init__(self, where: Slot, owner: Owner, acquired: float, version: str, heartbeat_s: float) -> None:
        self.slot, self.owner, self.acquired = where, owner, acquired
        self._version: str | None = version
        self._lock = threading.Lock()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"lease-{owner.token}")
        self._thread.start()

    @classmethod
    def try_acquire(cls, location: str, *, ttl_s: float = STALE_AFTER_S,
                    heartbeat_s: float = HEARTBEAT_S) -> Lease | None:
        """The lease of a store location if it is free or its holder is gone (taken over), else None."""
        where, owner, now = slot(location), new_owner(), time.time()
        data = _encode(owner, now, now)
        for _ in range(3):  # a lease released between our create and our read: try again
            version = where.create(data)
            if version is not None:
                return cls(where, owner, now, version, heartbeat_s)
            current = where.read()
            if current is None:
                continue
            stale = _holder(current, ttl_s)
            if stale.alive:
                return None
            version = where.replace(data, current.version)
            if version is None:
                return None  # another waiter took it over first, or the holder renewed
            log.warning("took over the build lease %s from %s (heartbeat %.0f s ago)", where.where, stale.label,
                        stale.age)
            return cls(where, owner, now, version, heartbeat_s)
        return None

    @property
    def lost(self) -> bool:
        """Whether another process took this lease over."""
        return self._lost.is_set()

    def check(self) -> None:
        """Raise LeaseLost if the lease was taken over (call before committing a build)."""
        if self.lost:
            raise LeaseLost(f"the build lease {self.slot.where} was taken over by another builder")

    def renew(self) -> None:
        """Write a fresh heartbeat; LeaseLost if another process took the lease over."""
        with self._lock:
            self.check()
            if self._version is None:
                raise LeaseLost(f"the build lease {self.slot.where} was released")
            version = self.slot.replace(_encode(self.owner, self.acquired, time.time()), self._version)
            if version is None:
                self._lost.set()
                self.check()
            self._version = version

    def _beat(self, heartbeat_s: float) -> None:
        while not self._stop.wait(heartbeat_s):
            try:
                self.renew()
            except LeaseLost as err:
                if not self._stop.is_set():
                    log.error("%s", err)
                return
            except Exception as err:  # a transient storage error: the next beat tries again
                log.warning("cannot renew the build lease %s: %s", self.slot.where, err)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease (unless it was taken over); idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._version is not None and not self.lost:
                self.slot.delete(self._version)
            self._version = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Outcome(enum.Enum):
    """How `wait_or_build` ended."""

    BUILT = "built"  # this process held the lease and ran build()
    READY = "ready"  # another process built the store (or it was there)
    STOPPED = "stopped"  # `stop` was set while waiting


def wait_or_build(location: str, build: Callable[[Lease], None], ready: Callable[[], bool], *,
                  poll_s: float = POLL_S, ttl_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                  on_wait: Callable[[HolderInfo | None], None] | None = None,
                  stop: threading.Event | None = None) -> Outcome:
    """Return once the store at `location` is ready: build it under the lease if this process wins it, or wait
    (every `poll_s`, telling `on_wait` who builds) while another does; a dead builder's lease is taken over."""
    stop = stop or threading.Event()
    while not stop.is_set():
        if ready():
            return Outcome.READY
        lease = Lease.try_acquire(location, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
        if lease is not None:
            with lease:
                if ready():  # committed between our check and our lease
                    return Outcome.READY
                build(lease)
            return Outcome.BUILT
        if on_wait is not None:
            on_wait(holder(location, ttl_s=ttl_s))
        stop.wait(poll_s)
    return Outcome.STOPPED
