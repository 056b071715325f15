"""Bearer tokens, TLS and mutual TLS against a real server, with the real client and CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sigil_feed.client.stream import BatchStream, FeedBatch
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.integration.conftest import Pki, feed_config, open_request, stream_status

TOKEN = "s3cret-Token_0123456789"


def first_batch(target: str, **options: Any) -> FeedBatch:
    """Open a stream with the real client and return its first batch."""
    with BatchStream(target, batch_size=2, connect_deadline_s=20, **options) as stream:
        return next(item for item in stream if isinstance(item, FeedBatch))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def rpc_codes(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> dict[str, grpc.StatusCode]:
    """The status of one call of every RPC (health and reflection included) with this metadata."""
    stub = feed_pb2_grpc.DataFeedStub(channel)
    calls = {
        "ListDatasets": lambda: stub.ListDatasets(feed_pb2.ListDatasetsRequest(), metadata=metadata, timeout=10),
        "GetStats": lambda: stub.GetStats(feed_pb2.GetStatsRequest(), metadata=metadata, timeout=10),
        "Stream": lambda: next(stub.Stream(iter([open_request(batch_size=1)]), metadata=metadata, timeout=10)),
        "Reflection": lambda: next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10)),
        "Health": lambda: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10),
    }
    codes = {}
    for name, call in calls.items():
        try:
            call()
            codes[name] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            codes[name] = err.code()
    return codes


def test_token_is_required_on_every_rpc_but_health(tmp_path: Path, start_server) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    server = start_server(feed_config(tmp_path, {"auth": {"token_file": "token"}}))
    refused = {name: grpc.StatusCode.UNAUTHENTICATED for name in ("ListDatasets", "GetStats", "Stream", "Reflection")}
    with grpc.insecure_channel(server.target) as channel:
        for metadata in [(), (("authorization", "Bearer wrong-token"),), (("authorization", TOKEN),),
                         (("authorization", f"Bearer {TOKEN}x"),), (("authorization", f"Basic {TOKEN}"),)]:
            assert rpc_codes(channel, metadata) == {**refused, "Health": grpc.StatusCode.OK}, metadata
        right = (("authorization", f"Bearer {TOKEN}"),)
        assert set(rpc_codes(channel, right).values()) == {grpc.StatusCode.OK}
    assert first_batch(server.target, metadata=right).arrays["input_ids"].shape[0] == 2
    assert cli("stats", "--target", server.target, "--json").returncode == 1
    token_file = str(tmp_path / "token")
    assert cli("stats", "--target", server.target, "--json", "--token-file", token_file).returncode == 0


def test_token_from_an_environment_variable(tmp_path: Path, start_server, monkeypatch) -> None:
    config = feed_config(tmp_path, {"auth": {"token_env": "SIGIL_TEST_TOKEN"}})
    result = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "serve", "--port", "0", "--config",
                             str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "server.auth.token_env" in result.stderr and "SIGIL_TEST_TOKEN" in result.stderr
    monkeypatch.setenv("SIGIL_TEST_TOKEN", TOKEN)
    server = start_server(config)
    with grpc.insecure_channel(server.target) as channel:
        stub = feed_pb2_grpc.DataFeedStub(channel)
        assert stub.ListDatasets(feed_pb2.ListDatasetsRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),),
                                 timeout=10).datasets[0].name == "default"
        with pytest.raises(grpc.RpcError) as err:
            stub.ListDatasets(feed_pb2.ListDatasetsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def refused_handshake(target: str, credentials: grpc.ChannelCredentials | None) -> bool:
    """True when a call over these credentials fails before reaching the service."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        try:
            feed_pb2_grpc.DataFeedStub(channel).ListDatasets(feed_pb2.ListDatasetsRequest(), timeout=5)
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.UNAVAILABLE
    return False


def test_tls_serves_only_clients_that_trust_the_server(tmp_path: Path, start_server, pki: Pki) -> None:
    server = start_server(feed_config(tmp_path, {"tls": {"cert_file": str(pki.server_cert),
                                                         "key_file": str(pki.server_key)}}))
    assert "transport=tls" in "".join(server.output)
    (ca,) = pki.read(pki.ca)
    batch = first_batch(server.target, credentials=grpc.ssl_channel_credentials(ca))
    assert batch.arrays["input_ids"].shape[0] == 2
    assert refused_handshake(server.target, None)  # plaintext client
    (other,) = pki.read(pki.ca.with_name("other-ca.pem"))
    assert refused_handshake(server.target, grpc.ssl_channel_credentials(other))  # does not trust the server
    assert cli("health", "--target", server.target, "--tls-ca", str(pki.ca)).stdout.strip() == "SERVING"


def test_mutual_tls_requires_a_certificate_from_the_client_ca(tmp_path: Path, start_server, pki: Pki) -> None:
    server = start_server(feed_config(tmp_path, {"tls": {"cert_file": str(pki.server_cert),
                                                         "key_file": str(pki.server_key),
                                                         "client_ca_file": str(pki.ca)}}))
    assert "transport=mutual-tls" in "".join(server.output)
    ca, cert, key, stranger_cert, stranger_key = pki.read(pki.ca, pki.client_cert, pki.client_key,
                                                          pki.stranger_cert, pki.stranger_key)
    batch = first_batch(server.target, credentials=grpc.ssl_channel_credentials(ca, key, cert))
    assert batch.arrays["input_ids"].shape[0] == 2
    assert refused_handshake(server.target, grpc.ssl_channel_credentials(ca))  # no client certificate
    assert refused_handshake(server.target, grpc.ssl_channel_credentials(ca, stranger_key, stranger_cert))
    ok = cli("health", "--target", server.target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
             "--tls-key", str(pki.client_key))
    assert ok.returncode == 0, ok.stderr
    assert cli("health", "--target", server.target, "--tls-ca", str(pki.ca)).returncode == 1


def test_unreadable_certificate_stops_serve_with_exit_code_2(tmp_path: Path) -> None:
    config = feed_config(tmp_path, {"tls": {"cert_file": "missing.pem", "key_file": "missing.key"}})
    result = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "serve", "--port", "0", "--config",
                             str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "server.tls.cert_file" in result.stderr and "missing.pem" in result.stderr


def test_a_certificate_and_key_that_do_not_match_are_a_tls_error_naming_both(tmp_path: Path, pki: Pki) -> None:
    config = feed_config(tmp_path, {"tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.client_key)}})
    result = cli("serve", "--port", "0", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "TLS" in result.stderr and str(pki.server_cert) in result.stderr and str(pki.client_key) in result.stderr
    assert "free port" not in result.stderr


def test_cursors_signed_with_the_configured_secret_resume_only_there(tmp_path: Path, start_server,
                                                                     monkeypatch) -> None:
    config = feed_config(tmp_path, {"cursor_secret_env": "SIGIL_TEST_CURSOR_SECRET"})
    assert "SIGIL_TEST_CURSOR_SECRET" in cli("serve", "--port", "0", "--config", str(config)).stderr
    monkeypatch.setenv("SIGIL_TEST_CURSOR_SECRET", "one secret")
    first = start_server(config)
    cursor = first_batch(first.target).cursor
    assert first_batch(first.target, cursor=cursor).cursor != cursor  # resumes after it
    first.stop()
    monkeypatch.setenv("SIGIL_TEST_CURSOR_SECRET", "another secret")
    second = start_server(config)
    with grpc.insecure_channel(second.target) as channel:
        code, details, _ = stream_status(feed_pb2_grpc.DataFeedStub(channel),
                                         [open_request(batch_size=2, cursor=cursor)])
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not made by this server" in details
