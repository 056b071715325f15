"""Each epoch's files are fixed when it first opens; a new membership is adopted only at an epoch's opening, and
one that cannot be readied leaves the epoch on the files it had."""

from __future__ import annotations

import pytest

from sigil_feed.server.feed.membership import KEPT, Membership, Memberships


def members(name: str, files: int) -> Membership:
    return Membership(name, [[f"f{k}" for k in range(files)]], [[[k, name] for k in range(files)]])


def test_an_epoch_keeps_its_files_and_the_next_one_takes_what_the_sources_hold_then() -> None:
    now = [members("a", 3)]
    adopted: list[str] = []
    ms = Memberships(now[0], look=lambda: now[0], adopt=lambda m: adopted.append(m.fingerprint), dataset="d")
    assert ms.of_epoch(0).fingerprint == "a"
    now[0] = members("b", 5)
    assert ms.of_epoch(0).fingerprint == "a"  # fixed when it opened: later ranks of epoch 0 read the same files
    assert ms.of_epoch(1).fingerprint == "b" and adopted == ["b"]
    assert ms.of_epoch(1).counts == [5] and ms.of("a") is not None
    assert [(e, m.fingerprint) for e, m in ms.fixed()] == [(0, "a"), (1, "b")]
    assert ms.recent() == {"a", "b"}


def test_a_membership_that_cannot_be_readied_leaves_the_epoch_on_the_files_it_had(
        caplog: pytest.LogCaptureFixture) -> None:
    def fail(m: Membership) -> None:
        raise OSError("disk full")

    ms = Memberships(members("a", 3), look=lambda: members("b", 4), adopt=fail, dataset="d")
    assert ms.of_epoch(0).fingerprint == "a"
    assert "could not be readied" in caplog.text and "disk full" in caplog.text


def test_memberships_of_epochs_long_over_are_forgotten() -> None:
    count = [0]

    def look() -> Membership:
        count[0] += 1
        return members(f"m{count[0]}", 1)

    ms = Memberships(members("m0", 1), look=look, adopt=lambda m: None, dataset="d")
    for epoch in range(KEPT + 10):
        ms.of_epoch(epoch)
    assert len(ms.fixed()) == KEPT and ms.of("m1") is None and len(ms.known) == KEPT
