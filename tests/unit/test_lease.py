"""The build lease, on a local folder and on a real S3-compatible server: exclusive, renewed, taken over race-free."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from sigil_feed.server.errors import ConfigError
from sigil_feed.server.store.lease import (
    LEASE,
    Lease,
    LeaseLost,
    Outcome,
    holder,
    slot,
    wait_or_build,
)
from sigil_feed.server.store.owner import new_owner

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys
from sigil_feed.server.store.lease import Lease
print("ready", flush=True)
sys.stdin.readline()  # go
lease = Lease.try_acquire(sys.argv[1])
print("won" if lease else "lost", flush=True)
sys.stdin.readline()  # hold until told (or killed)
if lease:
    lease.release()
"""


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store location: a local folder, or a prefix in a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "store" / "fp0")
    return f"{request.getfixturevalue('s3_bucket')}/root/fp0"


def write_record(location: str, record: dict[str, Any] | bytes) -> None:
    """Put a lease record in place as plain data (another host's build, or a torn write)."""
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    if location.startswith("s3://"):
        import boto3

        bucket, prefix = location[5:].split("/", 1)
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{LEASE}", Body=data)
    else:
        Path(location).mkdir(parents=True, exist_ok=True)
        (Path(location) / LEASE).write_bytes(data)


def other_host(renewed_ago: float) -> dict[str, Any]:
    """A lease record of a build on another machine, last renewed `renewed_ago` seconds ago."""
    owner = replace(new_owner(), host="otherhost", machine="otherhost:boot:pidns", pid=4242)
    now = time.time()
    return {**asdict(owner), "acquired": now - 2 * renewed_ago, "renewed": now - renewed_ago}


def race(n: int, attempt: Any) -> list[Any]:
    """Run `attempt()` in n threads released at once; their results."""
    barrier, results, lock = threading.Barrier(n), [], threading.Lock()

    def run() -> None:
        barrier.wait()
        result = attempt()
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def spawn_holder(location: str) -> subprocess.Popen[str]:
    """A process that takes the lease when told `go` on stdin, says `won` or `lost`, and holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, location], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_exactly_one_thread_wins(location: str) -> None:
    leases = [lease for lease in race(4, lambda: Lease.try_acquire(location)) if lease]
    assert len(leases) == 1
    info = holder(location)
    assert info is not None and info.alive and info.owner == leases[0].owner
    leases[0].release()
    assert holder(location) is None


def test_exactly_one_process_wins(location: str) -> None:
    procs = [spawn_holder(location) for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        said = [proc.stdout.readline().strip() for proc in procs if proc.stdout]
        assert sorted(said) == ["lost", "lost", "won"]
        winner = procs[said.index("won")]
        info = holder(location)
        assert info is not None and info.owner is not None and info.owner.pid == winner.pid and info.alive
    finally:
        for proc in procs:
            proc.communicate("\n", timeout=60)
    assert holder(location) is None  # the winner released it


def test_taken_over_after_sigkill_of_holder(location: str) -> None:
    proc = spawn_holder(location)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "won"
    assert Lease.try_acquire(location) is None
    info = holder(location)
    assert info is not None and info.alive
    assert info.describe().startswith(f"waiting for build by {info.owner.host}/{proc.pid} (heartbeat")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    info = holder(location)
    assert info is not None and not info.alive  # same machine: its PID is gone, whatever the heartbeat's age
    lease = Lease.try_acquire(location)
    assert lease is not None
    assert holder(location).owner == lease.owner
    lease.release()


def test_other_host_taken_over_only_after_its_heartbeat_is_stale(location: str) -> None:
    write_record(location, other_host(renewed_ago=5))
    assert Lease.try_acquire(location, ttl_s=60) is None
    info = holder(location, ttl_s=60)
    assert info is not None and info.alive and info.label == "otherhost/4242"
    assert 5 <= info.age < 30  # S3 requests under load take seconds
    assert info.describe() == f"waiting for build by otherhost/4242 (heartbeat {info.age:.0f} s ago)"

    write_record(location, other_host(renewed_ago=300))
    assert not holder(location, ttl_s=60).alive
    lease = Lease.try_acquire(location, ttl_s=60)
    assert lease is not None and holder(location).owner == lease.owner
    lease.release()


def test_a_heartbeat_dated_in_the_future_ages_by_the_storage_clock(location: str) -> None:
    """A record renewed ten years ahead (a clock running ahead, then the holder died; or forged) is as old as
    its last write: alive at first, stale once nobody rewrote it for ttl_s, never a negative age."""
    record = other_host(renewed_ago=0)
    record["renewed"] += 10 * 365 * 86400
    write_record(location, record)
    info = holder(location, ttl_s=1.5)
    assert info is not None and info.alive and 0 <= info.age < 1.5
    assert "heartbeat -" not in info.describe()
    time.sleep(2.2)  # an object's LastModified has whole seconds
    info = holder(location, ttl_s=1.5)
    assert info is not None and not info.alive and info.age >= 1.5
    lease = Lease.try_acquire(location, ttl_s=1.5)
    assert lease is not None and holder(location).owner == lease.owner
    lease.release()


def test_takeover_of_one_stale_lease_has_one_winner(location: str) -> None:
    write_record(location, other_host(renewed_ago=300))
    leases = [lease for lease in race(4, lambda: Lease.try_acquire(location, ttl_s=60)) if lease]
    assert len(leases) == 1
    assert holder(location).owner == leases[0].owner
    leases[0].release()


def test_two_takers_of_one_record_cannot_both_replace_it(location: str) -> None:
    write_record(location, other_host(renewed_ago=300))
    where = slot(location)
    seen = where.read()  # both takers judged this record stale
    assert seen is not None
    first, second = where.replace(b"taker one", seen.version), where.replace(b"taker two", seen.version)
    assert first is not None and second is None
    assert where.read().data == b"taker one"
    assert not where.delete(seen.version)  # a release by the old version is refused too
    assert where.create(b"taker three") is None
    assert where.delete(first) and where.read() is None


def test_renew_moves_the_heartbeat_and_release_frees_the_lease(location: str) -> None:
    lease = Lease.try_acquire(location, heartbeat_s=3600)
    assert lease is not None
    first = holder(location)
    time.sleep(0.05)
    lease.renew()
    second = holder(location)
    assert second.renewed > first.renewed and second.acquired == first.acquired
    with lease:
        pass  # the context manager releases
    assert holder(location) is None
    lease.release()  # idempotent
    again = Lease.try_acquire(location)
    assert again is not None
    again.release()


def test_heartbeat_thread_renews(location: str) -> None:
    with Lease.try_acquire(location, heartbeat_s=0.1) as lease:
        deadline = time.monotonic() + 60
        while holder(location).renewed == lease.acquired:
            assert time.monotonic() < deadline, "the heartbeat never renewed the lease"
            time.sleep(0.05)


def test_a_holder_taken_over_learns_it_and_leaves_the_new_lease(location: str) -> None:
    lease = Lease.try_acquire(location, heartbeat_s=3600)
    assert lease is not None
    write_record(location, other_host(renewed_ago=0))  # another host judged us stale and took over
    with pytest.raises(LeaseLost, match="taken over"):
        lease.renew()
    assert lease.lost
    with pytest.raises(LeaseLost):
        lease.check()
    lease.release()
    assert holder(location).label == "otherhost/4242"  # not deleted by the old holder


def test_torn_record_is_stale_after_the_ttl_by_its_mtime(tmp_path: Path) -> None:
    location = str(tmp_path / "fp0")
    write_record(location, b'{"host": "half')
    assert holder(location, ttl_s=60).alive  # being written, maybe
    assert Lease.try_acquire(location, ttl_s=60) is None
    old = time.time() - 300
    os.utime(Path(location) / LEASE, (old, old))
    info = holder(location, ttl_s=60)
    assert not info.alive and info.label == "an unknown builder"
    lease = Lease.try_acquire(location, ttl_s=60)
    assert lease is not None
    lease.release()


def test_wait_or_build_builds_once_and_the_others_wait(location: str, tmp_path: Path) -> None:
    manifest, builds, waits = tmp_path / "manifest.json", [], []
    built = threading.Event()

    def build(lease: Lease) -> None:
        builds.append(lease.owner)
        assert built.wait(60)  # hold the lease until a waiter has reported who builds
        lease.check()
        manifest.write_text("{}")

    def on_wait(info: Any) -> None:
        waits.append(info.describe() if info else None)
        if info is not None:
            built.set()

    outcomes = race(3, lambda: wait_or_build(location, build, manifest.exists, poll_s=0.05, on_wait=on_wait))
    assert sorted(o.value for o in outcomes) == ["built", "ready", "ready"]
    assert len(builds) == 1
    assert any(w and w.startswith(f"waiting for build by {builds[0].label}") for w in waits)
    assert holder(location) is None
    assert wait_or_build(location, build, manifest.exists) is Outcome.READY and len(builds) == 1


def test_wait_or_build_stops_when_told(location: str) -> None:
    write_record(location, other_host(renewed_ago=0))
    stop, seen = threading.Event(), []

    def on_wait(info: Any) -> None:
        seen.append(info.label)
        stop.set()

    outcome = wait_or_build(location, lambda lease: None, lambda: False, poll_s=0.01, on_wait=on_wait, stop=stop)
    assert outcome is Outcome.STOPPED and seen == ["otherhost/4242"]


def test_locations_without_a_lease_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"no build lease on gs://"):
        slot("gs://bucket/root/fp0")
    assert slot("file:///tmp/root/fp0").where == "/tmp/root/fp0/.lease"
