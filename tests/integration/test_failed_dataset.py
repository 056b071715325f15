"""A dataset that can never serve says so: the client stops at once with the server's reason, not after its
connect deadline with a hint that the server is unreachable."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from sigil_feed.client import BatchStream
from sigil_feed.client.stream import FeedServerError
from tests.conftest import rust_pair, write_config, write_jsonl


def test_a_failed_token_store_is_failed_precondition_with_its_reason(tmp_path: Path, start_server: Any) -> None:
    write_jsonl(tmp_path / "pairs.jsonl", [rust_pair(i) for i in range(8)])
    # more virtual ranks than samples: the store builds, but the dataset can never lay out an epoch
    config = write_config(tmp_path / "c.yaml", {"names": ["local:pairs.jsonl"], "use_cache": True,
                                                "cache_dir": str(tmp_path / "cache"), "virtual_ranks": 64})
    server = start_server(config)
    started = time.monotonic()
    with pytest.raises(FeedServerError) as err:
        BatchStream(server.target, batch_size=2, seq_len=64, connect_deadline_s=60)
    assert time.monotonic() - started < 30  # not the connect deadline
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot serve" in str(err.value) and "virtual_ranks is 64" in str(err.value)
