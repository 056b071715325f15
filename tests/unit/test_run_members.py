"""A run's records of its epochs' memberships, in a local folder and on a real S3-compatible server: the first
sidecar's record wins a race and every other sidecar takes it, a damaged record is replaced once (and named in the
log), old epochs and idle runs are pruned; sidecars' Memberships agree through them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest

from sigil_feed.client.dataset import default_run_id
from sigil_feed.server.config import load_config
from sigil_feed.server.errors import Unavailable
from sigil_feed.server.feed.membership import Membership, Memberships
from sigil_feed.server.feed.run_members import KEPT_EPOCHS, RunMembers, localize, run_folder
from sigil_feed.server.feed.served import ServedDataset, open_datasets
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.store.fs import StoreFS, resolve
from tests.conftest import rust_pair, write_config, write_jsonl
from tests.unit.test_lease import race

RUN = "job-17"


def make(files: list[list[str]], identities: list[list[object]]) -> Membership:
    """A membership named by its identities' hash, as served.py names one by its content."""
    return Membership(hashlib.sha256(json.dumps(identities).encode()).hexdigest()[:16], files, identities)


def members(*names: int, folder: str = "/data") -> Membership:
    """Files p{n}.jsonl of one source, each identified by its number."""
    return make([[f"{folder}/p{n}.jsonl" for n in names]], [[[100 + n, f"digest{n}"] for n in names]])


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFS:
    """A store location: a local folder, or a prefix in a fresh bucket on the moto server."""
    if request.param == "local":
        return resolve(tmp_path / "cache")
    return resolve(f"{request.getfixturevalue('s3_bucket')}/stores")


def records(fs: StoreFS) -> RunMembers:
    return RunMembers(fs, dataset="d", key="k0", sources=1, make=make)


def record_path(fs: StoreFS, epoch: int, run: str = RUN) -> str:
    return fs.path("runs", run_folder(run), "k0", f"epoch-{epoch:08d}.json")


def test_the_first_sidecar_to_claim_an_epoch_wins_and_every_other_takes_its_record(store: StoreFS) -> None:
    claims = [(records(store), seen) for seen in  # six sidecars, each seeing other files
              (members(0, 2), members(0, 1, 2), members(0, 1, 2, 3), members(5), members(6), members(7))]

    def claim() -> Membership:
        runs, seen = claims.pop()
        return runs.claim(RUN, 1, seen)

    won = race(6, claim)
    assert len({m.fingerprint for m in won}) == 1
    assert records(store).agreed(RUN, 1) == won[0]
    assert records(store).agreed(RUN, 2) is None and records(store).agreed("job-18", 1) is None
    assert records(store).claim(RUN, 1, members(9)) == won[0]  # later claims take it too


@pytest.mark.parametrize("damage", ["torn", "forged", "other-run", "sources"])
def test_a_damaged_record_is_named_in_the_log_and_replaced_once(
        store: StoreFS, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    good = members(0, 1)
    body = {"version": 1, "run": RUN, "dataset": "d", "epoch": 3, "members": good.fingerprint, "files": good.files,
            "identities": good.identities, "by": "host/1", "created": 0.0}
    data = {"torn": b'{"version": 1, "run": "jo',
            "forged": json.dumps({**body, "identities": [[[1, "other"], [2, "x"]]]}).encode(),
            "other-run": json.dumps({**body, "run": "job-99"}).encode(),
            "sources": json.dumps({**body, "files": [*good.files, []], "identities": [*good.identities, []]}).encode(),
            }[damage]
    store.fs.create_dir(store.path("runs", run_folder(RUN), "k0"), recursive=True)
    store.write_bytes(record_path(store, 3), data)
    assert records(store).agreed(RUN, 3) is None
    with caplog.at_level(logging.WARNING):
        won = race(4, lambda: records(store).claim(RUN, 3, members(0, 1, 2)))
    assert {m.fingerprint for m in won} == {members(0, 1, 2).fingerprint}
    assert records(store).agreed(RUN, 3) == members(0, 1, 2)
    warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert warned and store.uri(record_path(store, 3)) in warned[0], warned


def test_records_of_old_epochs_are_pruned(store: StoreFS, caplog: pytest.LogCaptureFixture) -> None:
    runs = records(store)
    with caplog.at_level(logging.WARNING):
        for epoch in range(KEPT_EPOCHS + 3):
            runs.claim(RUN, epoch, members(epoch))
    assert not caplog.records  # idle runs were looked for too, without error
    kept = sorted(info.base_name for info in store.listdir(store.path("runs", run_folder(RUN), "k0")))
    assert kept == [f"epoch-{e:08d}.json" for e in range(3, KEPT_EPOCHS + 3)]
    assert runs.agreed(RUN, 2) is None and runs.agreed(RUN, 3) == members(3)


def test_runs_idle_for_weeks_are_deleted_when_a_server_writes_its_first_record(tmp_path: Path) -> None:
    fs = resolve(tmp_path / "cache")
    records(fs).claim("old-job", 0, members(0))
    records(fs).claim("recent-job", 0, members(0))
    old = Path(record_path(fs, 0, "old-job"))
    os.utime(old, (time.time() - 15 * 86400, time.time() - 15 * 86400))
    records(fs).claim(RUN, 0, members(1))
    assert not old.parent.parent.exists() and Path(record_path(fs, 0, "recent-job")).exists()
    assert records(fs).agreed(RUN, 0) == members(1)


def test_a_recorded_membership_takes_the_paths_of_the_same_files_here() -> None:
    recorded = members(0, 2, folder="/node-a/data")
    here, missing = localize(recorded, members(0, 1, 2, folder="/node-b/data"))
    assert here.files == [["/node-b/data/p0.jsonl", "/node-b/data/p2.jsonl"]] and not missing
    assert here.fingerprint == recorded.fingerprint and here.identities == recorded.identities
    here, missing = localize(recorded, members(0, folder="/node-b/data"))
    assert here.files == [["/node-b/data/p0.jsonl", "/node-a/data/p2.jsonl"]]
    assert missing == ["/node-a/data/p2.jsonl"]


def test_an_unreachable_store_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(Unavailable, match="cannot write the run's record of epoch 0"):
        records(resolve(tmp_path / "file")).claim(RUN, 0, members(0))


def test_sidecars_of_a_run_agree_on_each_epoch_and_a_stream_without_a_run_decides_alone(tmp_path: Path) -> None:
    fs = resolve(tmp_path / "cache")
    sources = [members(0, 2)]
    adopted: dict[str, list[str]] = {"a": [], "b": []}

    def sidecar(name: str) -> Memberships:
        return Memberships(members(0, 2), look=lambda: sources[0], dataset="d", runs=records(fs),
                           adopt=lambda m: adopted[name].append(m.fingerprint))

    a, b = sidecar("a"), sidecar("b")
    assert a.of_epoch(1, RUN) == members(0, 2)
    sources[0] = members(0, 1, 2)  # lands after A opened epoch 1, before B opens it
    assert b.of_epoch(1, RUN) == members(0, 2) and adopted["b"] == []
    assert b.of_epoch(1) == members(0, 1, 2)  # a stream that names no run: this sidecar decides, as before
    assert b.of_epoch(2, RUN) == members(0, 1, 2)
    assert a.of_epoch(2, RUN) == members(0, 1, 2) and adopted["a"] == [members(0, 1, 2).fingerprint]

    def fail(m: Membership) -> None:
        raise Unavailable("its store cannot be opened here")

    sources[0] = members(0, 1, 2, 3)
    b.of_epoch(3, RUN)
    late = Memberships(members(0, 2), look=lambda: sources[0], adopt=fail, dataset="d", runs=records(fs))
    with pytest.raises(Unavailable):  # the run's membership, or none: never another one
        late.of_epoch(3, RUN)
    assert (RUN, 3) not in late.epochs


def test_the_run_id_comes_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SIGIL_FEED_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert default_run_id() == ""
    monkeypatch.setenv("SLURM_JOB_ID", "8812")
    assert default_run_id() == "8812"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default rendezvous id names no job
    assert default_run_id() == "8812"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "llm-7b-sft")
    assert default_run_id() == "llm-7b-sft"
    monkeypatch.setenv("SIGIL_FEED_RUN_ID", "mine")
    assert default_run_id() == "mine"


def node(root: Path, folder: str, runtime: Runtime, *, cached: bool) -> ServedDataset:
    """A node's dataset: its own copy of the data at its own path, the shared cache folder."""
    config = write_config(root / f"{folder}.yaml", {"names": [f"local:{folder}/*.jsonl"], "use_cache": cached,
                                                    "cache_dir": str(root / "cache")})
    dataset = open_datasets(load_config(config), runtime)["default"]
    dataset.prepare(show_bar=False)
    return dataset


def land(root: Path, folder: str, n: int) -> None:
    write_jsonl(root / folder / f"p{n}.jsonl", [rust_pair(i) for i in range(10 * n, 10 * n + 10)])


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streaming"])
def test_a_sidecar_serves_the_recorded_files_at_its_own_paths_and_waits_for_one_it_does_not_see(
        tmp_path: Path, runtime: Runtime, cached: bool) -> None:
    for folder in ("a", "b"):
        land(tmp_path, folder, 0)
        land(tmp_path, folder, 2)
    a, b = node(tmp_path, "a", runtime, cached=cached), node(tmp_path, "b", runtime, cached=cached)
    first = a.memberships.of_epoch(0, RUN)
    assert b.memberships.of_epoch(0, RUN).fingerprint == first.fingerprint  # the same content at other paths
    land(tmp_path, "a", 1)  # node A sees a new file; node B does not yet
    grown = a.memberships.of_epoch(1, RUN)
    assert grown.counts == [3] and grown.fingerprint != first.fingerprint
    if cached:  # A built and committed the grown store: B serves it without the file
        assert b.memberships.of_epoch(1, RUN).fingerprint == grown.fingerprint
        assert b.store is not None and b.store.manifest.fingerprint == grown.fingerprint
        return
    with pytest.raises(Unavailable, match=f"does not see 1 of them \\(first: {tmp_path / 'a' / 'p1.jsonl'}"):
        b.memberships.of_epoch(1, RUN)
    land(tmp_path, "b", 1)
    served = b.memberships.of_epoch(1, RUN)
    assert served.fingerprint == grown.fingerprint
    assert served.files == [[str(tmp_path / "b" / f"p{n}.jsonl") for n in range(3)]]
