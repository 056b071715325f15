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


class CountingProxy:
    """An HTTP proxy on loopback in front of an S3 server that counts the requests going through it, by (method,
    what): `list` (a bucket's listing), `head` or `get` of an object (a HeadObject or a GetObject), else the path.
    Point AWS_ENDPOINT_URL at `endpoint` to count a client's requests."""

    def __init__(self, target: str) -> None:
        import http.client
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        host, port = urlsplit(target).hostname or "127.0.0.1", urlsplit(target).port or 80
        self.counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        proxy, local = self, threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def body(self) -> bytes | None:
                """The request's body, read whole (chunked ones too)."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else None
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)

            def forward(self) -> None:
                sent = self.body()
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if sent is not None:
                    headers["Content-Length"] = str(len(sent))
                for attempt in range(2):  # a kept-alive connection the server closed: once more on a new one
                    if getattr(local, "conn", None) is None:
                        local.conn = http.client.HTTPConnection(host, port, timeout=60)
                    try:
                        local.conn.request(self.command, self.path, body=sent, headers=headers)
                        response = local.conn.getresponse()
                        data = response.read()
                        break
                    except (OSError, http.client.HTTPException):
                        local.conn.close()
                        local.conn = None
                        if attempt:
                            raise
                proxy.count(self.command, self.path)
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(key, value)
                self.send_header("Content-Length", response.getheader("Content-Length") or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-proxy", daemon=True)

    def count(self, method: str, path: str) -> None:
        """Count one request: a bucket's listing, an object's HEAD or GET, or any other by its method and path."""
        where, _, query = path.partition("?")
        parts = where.strip("/").split("/", 1)
        if method == "GET" and len(parts) == 1 and "list-type=2" in query:
            key = ("list", parts[0])
        elif method in ("HEAD", "GET") and len(parts) == 2:
            key = (method.lower(), parts[1])
        else:
            key = (method, where)
        with self._lock:
            self.counts[key] += 1

    def taken(self) -> dict[tuple[str, str], int]:
        """The counts so far, which start again from zero."""
        with self._lock:
            counts, self.counts = dict(self.counts), self.counts.__class__()
        return counts

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
