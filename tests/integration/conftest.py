"""Fixtures for the production tests: servers shared by a module, configs with a `server:` section, a test PKI."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import ServerProcess, running_servers, rust_pair, write_config, write_jsonl

METRICS = re.compile(r"metrics on (http://\S+)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `slow` run only with SIGIL_FEED_SLOW=1."""
    if item.get_closest_marker("slow") and os.environ.get("SIGIL_FEED_SLOW") != "1":
        pytest.skip("slow: set SIGIL_FEED_SLOW=1 to run")


def feed_config(folder: Path, server: dict[str, Any], *, pairs: int = 40, **top: Any) -> Path:
    """A JSONL corpus of `pairs` pipeline pairs and a trainer config serving it with this `server:` section."""
    write_jsonl(folder / "pairs.jsonl", [rust_pair(i) for i in range(pairs)])
    return write_config(folder / "trainer.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False},
                        server=server, **top)


def metrics_url(server: ServerProcess) -> str:
    """The /metrics URL a server printed (it prints it before `listening on`)."""
    for line in server.output:
        match = METRICS.search(line)
        if match:
            return match.group(1)
    raise AssertionError("server printed no metrics address:\n" + "".join(server.output))


def open_request(**fields: Any) -> feed_pb2.StreamRequest:
    """A StreamRequest carrying Open(**fields)."""
    return feed_pb2.StreamRequest(open=feed_pb2.Open(**fields))


def stream_status(stub: feed_pb2_grpc.DataFeedStub, requests: list[feed_pb2.StreamRequest],
                  timeout: float = 20) -> tuple[grpc.StatusCode, str, list[feed_pb2.StreamResponse]]:
    """Send `requests` (then half-close) and collect the answers until the status."""
    responses: list[feed_pb2.StreamResponse] = []
    try:
        for response in stub.Stream(iter(requests), timeout=timeout):
            responses.append(response)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", responses
    return grpc.StatusCode.OK, "", responses


@pytest.fixture(scope="module")
def module_server() -> Iterator[Callable[..., ServerProcess]]:
    """Like `start_server`, but the servers live for the whole test module."""
    with running_servers() as start:
        yield start


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, and client certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from another CA
    stranger_key: Path

    def read(self, *paths: Path) -> list[bytes]:
        """The files' bytes."""
        return [p.read_bytes() for p in paths]


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}")


def _leaf(folder: Path, ca: str, name: str, extensions: str) -> None:
    _openssl(folder, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates made with the openssl command line, valid for two days."""
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "other-ca")
    _leaf(folder, "ca", "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _leaf(folder, "ca", "client", "extendedKeyUsage=clientAuth\n")
    _leaf(folder, "other-ca", "stranger", "extendedKeyUsage=clientAuth\n")
    return Pki(*(folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key",
                                            "stranger.pem", "stranger.key")))
