"""boto3 comes with the `s3` extra only: without it the server builds and serves local stores, and an s3://
store that needs a build lease is refused with the extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sigil_feed.client import BatchStream, FeedBatch
from sigil_feed.server.errors import ConfigError
from sigil_feed.server.store.lease import slot
from tests.conftest import ServerProcess, rust_pair, write_config, write_jsonl

HIDE_BOTO3 = "import sys\nsys.modules['boto3'] = sys.modules['botocore'] = None  # as if not installed\n"


def test_an_s3_lease_without_boto3_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigError, match=r"boto3.*sigil-feed\[s3\]"):
        slot("s3://bucket/stores/abc")


def test_a_local_store_builds_and_serves_without_boto3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       start_server: Callable[..., ServerProcess]) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(HIDE_BOTO3)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                                                   os.environ.get("PYTHONPATH")])))
    write_jsonl(tmp_path / "pairs.jsonl", [rust_pair(i) for i in range(40)])
    config = write_config(tmp_path / "c.yaml", {"names": [f"local:{tmp_path / 'pairs.jsonl'}"], "use_cache": True,
                                                "cache_dir": str(tmp_path / "cache")})
    server = start_server(config)
    assert subprocess.run([sys.executable, "-c", "import boto3"], capture_output=True).returncode != 0
    with BatchStream(server.target, batch_size=2, connect_deadline_s=30) as stream:
        batch = next(stream)
    assert isinstance(batch, FeedBatch) and batch.arrays["input_ids"].shape[0] == 2
    assert list((tmp_path / "cache").glob("*/manifest.json")), "the store was built under the local lease"
