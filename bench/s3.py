"""A local S3-compatible server for benchmarks and tests: `moto_server` (from `moto[server]`) on a loopback port."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
"""The credentials and region moto accepts; add AWS_ENDPOINT_URL for the server."""


@contextlib.contextmanager
def moto_server(timeout_s: float = 60) -> Iterator[str]:
    """Start moto_server on a free loopback port; yields its endpoint URL, and stops it on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.kill()
        proc.wait()


def make_bucket(endpoint: str) -> str:
    """A fresh bucket on the local S3 server; returns `s3://BUCKET`."""
    import pyarrow.fs as pafs

    bucket = f"test-{secrets.token_hex(6)}"
    pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", access_key="testing",
                      secret_key="testing", region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}"


@contextlib.contextmanager
def aws_environment(endpoint: str) -> Iterator[None]:
    """The standard AWS environment pointing at the local server, for this process and the ones it starts."""
    saved = {key: os.environ.get(key) for key in ("AWS_ENDPOINT_URL", *S3_ENV)}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, **S3_ENV})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
