"""Token loading and checking, and the `server.auth` / `server.tls` config rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from sigil_feed.server.config import AuthSection, TlsSection, parse_config
from sigil_feed.server.errors import ConfigError
from sigil_feed.server.rpc.security import bearer_matches, load_token, server_credentials

TOKEN = b"tok-123"


@pytest.mark.parametrize(("metadata", "ok"), [
    ((("authorization", "Bearer tok-123"),), True),
    ((("authorization", "bearer tok-123"),), True),
    ((("x-other", "1"), ("authorization", "Bearer tok-123")), True),
    ((("authorization", b"Bearer tok-123"),), True),
    ((), False),
    (None, False),
    ((("authorization", "Bearer tok-12"),), False),
    ((("authorization", "Bearer tok-1234"),), False),
    ((("authorization", "tok-123"),), False),
    ((("authorization", "Basic tok-123"),), False),
    ((("authorization", "Bearer "),), False),
    ((("authorization", "Bearer wrong"), ("authorization", "Bearer tok-123")), False),
])
def test_bearer_matches_only_the_exact_token(metadata, ok: bool) -> None:
    assert bearer_matches(metadata, TOKEN) is ok


def test_token_from_a_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  tok-123\n")
    assert load_token(AuthSection(token_file="token"), str(tmp_path / "c.yaml")) == "tok-123"


def test_token_from_an_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv("FEED_TOKEN", "tok-123")
    assert load_token(AuthSection(token_env="FEED_TOKEN"), "c.yaml") == "tok-123"


@pytest.mark.parametrize(("auth", "env", "key"), [
    ({"token_env": "FEED_TOKEN"}, None, "server.auth.token_env"),
    ({"token_env": "FEED_TOKEN"}, " ", "server.auth.token_env"),
    ({"token_file": "missing"}, None, "server.auth.token_file"),
])
def test_missing_or_empty_token_is_a_config_error(tmp_path: Path, monkeypatch, auth, env, key) -> None:
    monkeypatch.delenv("FEED_TOKEN", raising=False)
    if env is not None:
        monkeypatch.setenv("FEED_TOKEN", env)
    with pytest.raises(ConfigError, match=key):
        load_token(AuthSection(**auth), str(tmp_path / "c.yaml"))


def parse(server: dict) -> None:
    parse_config({"model_name": "t", "dataset": {"names": ["local:x"]}, "server": server}, "c.yaml", Path("."))


@pytest.mark.parametrize(("server", "key", "message"), [
    ({"auth": {"token": "plain"}}, "server.auth", "never goes in the config file"),
    ({"auth": {}}, "server.auth", "exactly one of token_file and token_env"),
    ({"auth": {"token_file": "a", "token_env": "B"}}, "server.auth", "exactly one"),
    ({"tls": {"cert_file": "c.pem"}}, "server.tls.key_file", "Field required"),
    ({"metrics_port": 70000}, "server.metrics_port", "65535"),
    ({"keepalive": {"time_s": 0}}, "server.keepalive.time_s", "greater than 0"),
    ({"limits": {"max_cursor_kb": 0}}, "server.limits.max_cursor_kb", "greater than 0"),
])
def test_bad_server_security_settings_name_the_key(server: dict, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse(server)
    assert err.value.key == key


def test_unreadable_tls_file_names_its_key(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"server\.tls\.key_file") as err:
        server_credentials(TlsSection(cert_file="cert.pem", key_file="key.pem"), str(tmp_path / "c.yaml"))
    assert "key.pem" in str(err.value)
