"""Auth service settings: the kit's reader under TRADEGUARD_AUTH_, each value checked, the variable named in every
error, the Redis password never shown."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.auth.settings import DEFAULT_HSTS, DEFAULT_ROUTE_PERMISSIONS, Settings
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import CommonSettings
from tradeguard.settings import Env, SettingsError

PREFIX = "TRADEGUARD_AUTH"


def read(tmp_path: Path, **values: str) -> Settings:
    environ = {f"{PREFIX}_{key}": value for key, value in values.items()}
    common = CommonSettings(
        server=ServerConfig(name="auth", port=0, home=tmp_path),
        database_url=f"sqlite:///{tmp_path / 'data' / 'auth.db'}",
    )
    return Settings.read(Env(PREFIX, environ), common)


def test_defaults(tmp_path: Path) -> None:
    s = read(tmp_path)
    assert s.redis is None  # hot state in process: `make run` needs nothing else
    assert s.keyvault_target == "127.0.0.1:50054" and s.keyvault_server_name == "keyvault"
    assert (s.credentials_key, s.jwt_key) == ("credentials", "auth/jwt")
    assert (s.issuer, s.audience) == ("tradeguard-auth", "tradeguard")
    assert (s.access_ttl_s, s.refresh_ttl_s, s.mfa_token_ttl_s) == (300, 30 * 86400, 300)
    assert s.jwt_algorithms == ("EdDSA",)
    assert (s.replay_window_ms, s.future_skew_ms) == (5000, 1000)
    assert s.mfa_required_permissions == {"orders:write", "withdraw"}
    assert s.lockout.pair_threshold == 5 and s.lockout.account_threshold == 20
    assert s.route_permissions == DEFAULT_ROUTE_PERMISSIONS and s.hsts == DEFAULT_HSTS


def test_values_are_read(tmp_path: Path) -> None:
    s = read(
        tmp_path,
        KEYVAULT_TARGET="10.0.0.7:6000",
        ISSUER="https://auth.example",
        AUDIENCE="api",
        ACCESS_TTL_S="60",
        JWT_ALGORITHMS="EdDSA, ES256",
        REPLAY_WINDOW_S="60",
        FUTURE_SKEW_S="0",
        MFA_REQUIRED_PERMISSIONS="withdraw",
        LOCKOUT_PAIR_THRESHOLD="3",
        LOCKOUT_ACCOUNT_THRESHOLD="4",
        LOCKOUT_KEY_THRESHOLD="9",
        ROUTE_PERMISSIONS="/v1/orders=orders:write, /v1/public/*=, /v1/*=orders:read",
        HSTS="max-age=31536000",
    )
    assert s.keyvault_target == "10.0.0.7:6000" and s.issuer == "https://auth.example" and s.audience == "api"
    assert s.access_ttl_s == 60 and s.jwt_algorithms == ("EdDSA", "ES256")
    assert (s.replay_window_ms, s.future_skew_ms) == (60_000, 0)
    assert s.mfa_required_permissions == {"withdraw"}
    assert (s.lockout.pair_threshold, s.lockout.account_threshold, s.lockout.key_threshold) == (3, 4, 9)
    assert dict(s.route_permissions) == {
        "/v1/orders": "orders:write",
        "/v1/public/*": "",
        "/v1/*": "orders:read",
    }
    assert read(tmp_path, MFA_REQUIRED_PERMISSIONS="none").mfa_required_permissions == frozenset()
    # a firm's own service may declare permissions beyond the platform's
    assert read(tmp_path, ROUTE_PERMISSIONS="/firm.Svc/Transfer=treasury:move").route_permissions == {
        "/firm.Svc/Transfer": "treasury:move"
    }


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("REPLAY_WINDOW_S", "61", "between 0.001 and 60"),  # the standard's maximum
        ("REPLAY_WINDOW_S", "0", "between"),
        ("REPLAY_WINDOW_S", "nan", "finite"),
        ("FUTURE_SKEW_S", "2", "between 0 and 1"),
        ("ACCESS_TTL_S", "86400", "between 30 and 3600"),
        ("REFRESH_TTL_S", "five", "must be an integer"),
        ("MFA_TOKEN_TTL_S", "10", "between 30 and 900"),
        ("JWT_ALGORITHMS", "none", "EdDSA, ES256"),  # RFC 8725: never `none`
        ("JWT_ALGORITHMS", "HS256", "EdDSA, ES256"),  # never an HMAC algorithm a public key could key
        ("JWT_ALGORITHMS", "EdDSA,", "EdDSA, ES256"),
        ("KEYVAULT_TARGET", "keyvault", "host:port"),
        ("KEYVAULT_TARGET", "127.0.0.1:0", "host:port"),
        ("KEYVAULT_SERVER_NAME", "Key Vault", "DNS name"),
        ("JWT_KEY", "../jwt", "key vault key name"),
        ("ISSUER", " padded", "printable"),
        ("MFA_REQUIRED_PERMISSIONS", "orders:write,Trade", "'Trade' is not a permission"),
        ("ROUTE_PERMISSIONS", "/v1/orders", "<path>=<permission>"),
        ("ROUTE_PERMISSIONS", "v1/orders=orders:read", "<path>=<permission>"),
        ("ROUTE_PERMISSIONS", "/v1/*/x=orders:read", "<path>=<permission>"),
        ("ROUTE_PERMISSIONS", "/a=orders:read,/a=withdraw", "given twice"),
        ("ROUTE_PERMISSIONS", "/a=orders:write:all", "'orders:write:all' is not a permission"),
        ("HSTS", "max-age=60", "one year"),
        ("HSTS", "includeSubDomains", "max-age"),
        ("LOCKOUT_PAIR_THRESHOLD", "0", "between 1 and 1000"),
        ("LOCKOUT_ACCOUNT_THRESHOLD", "5", "must be greater than TRADEGUARD_AUTH_LOCKOUT_PAIR_THRESHOLD"),
        ("LOCKOUT_KEY_THRESHOLD", "3", "must be greater than TRADEGUARD_AUTH_LOCKOUT_PAIR_THRESHOLD"),
        ("LOCKOUT_MAX_S", "1", "at least TRADEGUARD_AUTH_LOCKOUT_BASE_S"),
        ("LOCKOUT_WINDOW_S", "-1", "between"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(
    tmp_path: Path, key: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        read(tmp_path, **{key: value})
    assert f"{PREFIX}_{key}" in str(refused.value)
    assert expected in str(refused.value)


def test_redis_url_and_password_file(tmp_path: Path) -> None:
    """Hot state in Redis by configuration; the password from an owner-only file, never shown."""
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret-pw\n")
    secret.chmod(0o600)
    s = read(tmp_path, REDIS_URL="redis://127.0.0.1:6379/2", REDIS_PASSWORD_FILE=str(secret))
    assert s.redis is not None and s.redis.password == "s3cret-pw" and s.redis.db == 2
    assert "s3cret-pw" not in repr(s) and "s3cret-pw" not in str(s.redis)
    secret.chmod(0o644)
    with pytest.raises(SettingsError, match=f"{PREFIX}_REDIS_PASSWORD_FILE.*chmod 600"):
        read(tmp_path, REDIS_URL="redis://127.0.0.1:6379", REDIS_PASSWORD_FILE=str(secret))
    with pytest.raises(SettingsError, match=f"{PREFIX}_REDIS_URL") as bad:
        read(tmp_path, REDIS_URL="redis://user:hunter2@127.0.0.1:bad")
    assert "hunter2" not in str(bad.value)
    with pytest.raises(SettingsError, match=f"{PREFIX}_REDIS_PASSWORD is set but {PREFIX}_REDIS_URL is not"):
        read(tmp_path, REDIS_PASSWORD="x")


def test_a_plain_redis_password_leaves_the_environment(tmp_path: Path) -> None:
    environ = {f"{PREFIX}_REDIS_URL": "redis://127.0.0.1:6379", f"{PREFIX}_REDIS_PASSWORD": "pw-in-env"}
    common = CommonSettings(
        server=ServerConfig(name="auth", port=0, home=tmp_path), database_url="sqlite:///x"
    )
    s = Settings.read(Env(PREFIX, environ), common)
    assert s.redis is not None and s.redis.password == "pw-in-env"
    assert f"{PREFIX}_REDIS_PASSWORD" not in environ  # a child process never inherits it
    assert f"{PREFIX}_REDIS_PASSWORD" not in os.environ
