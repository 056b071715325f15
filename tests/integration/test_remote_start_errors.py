"""`serve` over remote sources that cannot be read at start stops with one line saying why and what to do, never a
traceback, and never prints a secret: credentials written into a source's URI (exit code 2: they are not read),
and an S3 endpoint that does not answer within the storage retry window (exit code 3: start again later)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from sigil_feed.server.store.retry import STORAGE_RETRY_ENV
from tests.conftest import write_config

SECRET = "wJalrXUtnFEMI-topsecret"


def serve(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "serve", "--config", str(config),
                           "--port", "0"], capture_output=True, text=True, timeout=120, cwd=config.parent,
                          env={**os.environ, STORAGE_RETRY_ENV: "1", "AWS_ACCESS_KEY_ID": "AKIATEST",
                               "AWS_SECRET_ACCESS_KEY": SECRET, **env})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_credentials_in_a_source_uri_stop_serve_without_printing_them(tmp_path: Path) -> None:
    for spec in (f"local:s3://AKIATEST:{SECRET}@bucket/data/*.jsonl", f"parquet:gs://someone:{SECRET}@bucket/d/"):
        result = serve(write_config(tmp_path / "trainer.yaml", {"names": [spec], "use_cache": False}),
                       AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}")
        assert result.returncode == 2, result.stderr
        assert SECRET not in result.stderr + result.stdout and "Traceback" not in result.stderr, result.stderr
        assert "://***@bucket/" in result.stderr and "AWS_SECRET_ACCESS_KEY" in result.stderr, result.stderr


def test_an_s3_endpoint_down_at_start_stops_serve_with_one_line(tmp_path: Path) -> None:
    spec = "local:s3://bucket/data/*.jsonl"
    result = serve(write_config(tmp_path / "trainer.yaml", {"names": [spec], "use_cache": False}),
                   AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("sigil-feed: error: ")]
    assert "s3://bucket/data/*.jsonl" in line and STORAGE_RETRY_ENV in line and "AWS_ENDPOINT_URL" in line, line
