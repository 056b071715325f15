"""A store on object storage that goes away mid-epoch, for longer than the server's retry window: the stream ends
UNAVAILABLE (never INTERNAL), the real client reconnects and resumes, and the epoch is the uninterrupted one."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.server.config import load_config
from sigil_feed.server.feed.served import open_datasets
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.store.fs import resolve
from sigil_feed.server.store.retry import STORAGE_RETRY_ENV
from tests.conftest import batch_digest
from tests.fault_proxy import FaultProxy
from tests.integration.test_scale_out import config, the_store, write_corpus


def test_an_outage_longer_than_the_retry_window_ends_the_stream_unavailable_and_the_client_resumes_it(
        tmp_path: Path, s3_endpoint: str, s3_bucket: str, start_server, runtime: Runtime,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The server reaches S3 through a fault proxy, gives up a fetch after 2 s without progress and has room for
    2.5 shards of six; after three batches every connection to S3 is reset from the next shard fetch on, until the
    stream has broken (a fixed outage could meet only a prefetch and end before the stream needs that shard)."""
    write_corpus(tmp_path, records=120, repeat=12)
    location = f"{s3_bucket}/stores"
    for dataset in open_datasets(load_config(config(tmp_path, "build", str(tmp_path / "built"))), runtime).values():
        dataset.prepare(serve=False, show_bar=False)  # built here and uploaded: the same store, built sooner
    pafs.copy_files(str(tmp_path / "built"), location.removeprefix("s3://"),
                    destination_filesystem=resolve(location).fs)
    fs, store = the_store(location)
    sizes = [info.size for info in fs.listdir(f"{store}/shards") if info.path.endswith(".tokens.bin")]
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.endpoint}")
        monkeypatch.setenv(STORAGE_RETRY_ENV, "2")
        server = start_server(config(tmp_path, "serve", location, shard_cache_dir=str(tmp_path / "shard-cache"),
                                     shard_cache_gb=2.5 * max(sizes) / 1e9))
        reference = [batch_digest(batch) for batch in FeedDataset(server.target, batch_size=4)]
        assert len(reference) > 20

        digests = []
        with caplog.at_level(logging.INFO, logger="sigil_feed.client"):
            for batch in FeedDataset(server.target, batch_size=4):
                digests.append(batch_digest(batch))
                if len(digests) == 3:
                    proxy.fault_on_request(rb"GET [^ ]+\.tokens\.bin", "reset", 60)
                    threading.Thread(target=end_outage_once_broken, args=(proxy, caplog), daemon=True).start()
    assert digests == reference  # no batch lost, none repeated
    broke = [r.getMessage() for r in caplog.records if "broke" in r.getMessage()]
    assert broke and all("(UNAVAILABLE: cannot fetch shard s3://" in line for line in broke), broke
    assert any("NETWORK_CONNECTION" in line for line in broke)
    assert not any("tokenizing" in line or "INTERNAL" in line for line in server.output)


def end_outage_once_broken(proxy: FaultProxy, caplog: pytest.LogCaptureFixture) -> None:
    """Storage comes back once the client has logged a broken stream (or after 60 s, failing the test)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("broke" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    proxy.set("pass")
