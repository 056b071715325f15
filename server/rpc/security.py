"""Transport security and bearer tokens: server credentials, the token check, and the client side of both."""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import AuthSection, TlsSection

HEALTH_PREFIX = "/grpc.health.v1.Health/"
"""Health checks need no token: probes (kubelet, HEALTHCHECK) carry none."""


def _path(path_text: str, config_file: str) -> Path:
    path = Path(path_text)
    return path if path.is_absolute() else Path(config_file).parent / path


def _read(path_text: str, key: str, config_file: str) -> bytes:
    path = _path(path_text, config_file)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}", key=key, file=config_file,
                          fix="point it at a readable file (relative paths start at the config file's folder)") \
            from None


def server_credentials(tls: TlsSection, config_file: str) -> grpc.ServerCredentials:
    """TLS credentials from `server.tls`; with `client_ca_file`, clients must present a certificate it signed."""
    chain = _read(tls.cert_file, "server.tls.cert_file", config_file)
    key = _read(tls.key_file, "server.tls.key_file", config_file)
    client_ca = _read(tls.client_ca_file, "server.tls.client_ca_file", config_file) if tls.client_ca_file else None
    _check_pair(tls, config_file)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _check_pair(tls: TlsSection, config_file: str) -> None:
    """A TLS error naming both files when the key is not the certificate's (or either is not PEM): gRPC would
    only fail later, at listen time, with no word of TLS."""
    cert, key = _path(tls.cert_file, config_file), _path(tls.key_file, config_file)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as err:
        raise ConfigError(f"TLS: the certificate {cert} and the key {key} do not make a key pair "
                          f"({getattr(err, 'reason', None) or err})", key="server.tls", file=config_file,
                          fix="point cert_file and key_file at a certificate and its own private key (PEM)") \
            from None


def load_cursor_secret(name: str | None, config_file: str) -> bytes:
    """The key that signs cursors, from the variable named by `server.cursor_secret_env` (empty when unset)."""
    if name is None:
        return b""
    secret = os.environ.get(name, "").strip()
    if not secret:
        raise ConfigError(f"the environment variable {name} is not set or empty", key="server.cursor_secret_env",
                          file=config_file, fix=f"export {name}=<a long random string, the same on every restart>")
    return secret.encode()


def load_token(auth: AuthSection, config_file: str) -> str:
    """The bearer token from `server.auth.token_file` or the variable named by `server.auth.token_env`."""
    if auth.token_env is not None:
        key = "server.auth.token_env"
        if auth.token_env not in os.environ:
            raise ConfigError(f"the environment variable {auth.token_env} is not set", key=key, file=config_file,
                              fix=f"export {auth.token_env}=<token> before starting the server")
        token = os.environ[auth.token_env].strip()
    else:
        key = "server.auth.token_file"
        token = _read(str(auth.token_file), key, config_file).decode().strip()
    if not token:
        raise ConfigError("the token is empty", key=key, file=config_file)
    return token


def bearer_matches(metadata: tuple[tuple[str, str | bytes], ...] | None, token: bytes) -> bool:
    """True when the `authorization` metadata is `Bearer <token>`; compares in constant time."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), token)
    return False


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or wrong bearer token: send metadata `authorization: Bearer <token>`")


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that refuses before reading anything."""
    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_refuse)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_refuse)
    return grpc.unary_unary_rpc_method_handler(_refuse)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but health must carry `authorization: Bearer <token>`, else UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(HEALTH_PREFIX) or bearer_matches(
                handler_call_details.invocation_metadata, self._token):  # type: ignore[attr-defined]
            return await continuation(handler_call_details)
        return _refusal(await continuation(handler_call_details))


def channel_credentials(root_file: str | None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """Client TLS credentials: the CA that signed the server, and for mutual TLS this client's cert and key."""
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(root_file), read(key_file), read(cert_file))


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
