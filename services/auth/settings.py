"""Auth service settings, read once at start-up through the kit's reader (tradeguard.service.read_settings).

Every variable is under the one prefix TRADEGUARD_AUTH_; a bad value is refused naming the variable.

Stores:
- DATABASE_URL: records, `sqlite:///<path>` (default `$TRADEGUARD_HOME/data/auth.db`) or `postgresql://…`.
- REDIS_URL (optional; `…_URL_FILE` for a URL holding a password), REDIS_PASSWORD (preferably
  REDIS_PASSWORD_FILE): hot state (nonces, lockout counters, TOTP steps, revocations) in Redis, shared by
  replicas; unset: in process (one replica). See tradeguard.storage.redis for the URL's options.
- KEYVAULT_TARGET: host:port of the key vault (default 127.0.0.1:<the registry's key vault port>),
  KEYVAULT_SERVER_NAME: the name its certificate carries (default `keyvault`). The auth service calls it as
  workload `auth`; the keys CREDENTIALS_KEY (default `credentials`, AES-256-GCM) and JWT_KEY (default
  `auth/jwt`, Ed25519) must exist (`tradeguard up` creates them as ops).

Tokens:
- ISSUER (default `tradeguard-auth`), AUDIENCE (default `tradeguard`): the JWTs' `iss` and `aud`.
- ACCESS_TTL_S (default 300, 30..3600), REFRESH_TTL_S (default 2,592,000 = 30 days, 300..90 days),
  MFA_TOKEN_TTL_S (default 300, 30..900): how long a Login's mfa_token may be presented to VerifyMfa.
- JWT_ALGORITHMS: the algorithms a token may be verified with, comma-separated, from EdDSA and ES256
  (default EdDSA). Never taken from the token (RFC 8725).

Signed API-key requests:
- REPLAY_WINDOW_S (default 5, 0.001..60): how old a timestamp may be; nonces are remembered this long.
- FUTURE_SKEW_S (default 1, 0..1): how far in the future a timestamp may be.

Second factor:
- MFA_REQUIRED_PERMISSIONS: a user holding any of these permissions must pass a second factor to get tokens
  (comma-separated; default `orders:write,withdraw`; empty: `none`).
- TOTP_ISSUER: the issuer shown by authenticator apps (default `Tradeguard`).

Lockout (failures counted per (account, source IP), per account, per API key and per source IP, within
LOCKOUT_WINDOW_S; at a threshold the subject is locked for LOCKOUT_BASE_S, doubling per further lock up to
LOCKOUT_MAX_S): LOCKOUT_PAIR_THRESHOLD (default 5), LOCKOUT_ACCOUNT_THRESHOLD (default 20: higher than the
pair's, so one address cannot cheaply lock a user out), LOCKOUT_KEY_THRESHOLD (default 20, also above the
pair's), LOCKOUT_IP_THRESHOLD (default 100), LOCKOUT_WINDOW_S (default 900), LOCKOUT_BASE_S (default 30),
LOCKOUT_MAX_S (default 3600).

The HTTP edge (Envoy's ext_authz Check):
- ROUTE_PERMISSIONS: the permission each HTTP route needs, comma-separated `<route>=<permission>` entries; a
  route is an exact path (`/pkg.Service/Method`) or a prefix ending in `/*`; the most specific match wins; an
  empty permission (`<route>=`) lets any authenticated caller through; a path no route matches is refused (403).
  Default: the trading service's methods (PlaceOrder, CancelOrder: orders:write; GetOrder, ListOrders:
  orders:read).
- HSTS: the Strict-Transport-Security value on every Check answer (default
  `max-age=63072000; includeSubDomains; preload`; max-age at least one year).

Guards:
- GUARD_WORKLOADS: workload names (comma-separated) allowed to run a guard against this service (GetJwks,
  WatchRevocations, VerifySignedRequests) besides the suite's own services: a firm's own guarded services.

Security events:
- AUDIT (default true), AUDIT_TARGET (default 127.0.0.1:<the registry's audit port>), AUDIT_SERVER_NAME: users,
  roles, logins, second factors, token refresh and revocation, API key creation, rotation and revocation are
  recorded in the audit service before their answer is released (tradeguard.audit.recording: fail closed).

Plus the shared server settings (ServerConfig.from_env).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from tradeguard.audit.recording import RecordingSettings
from tradeguard.guard.jwt import DEFAULT_ALGORITHMS
from tradeguard.mesh.server import ServerConfig
from tradeguard.registry import lookup
from tradeguard.service import CommonSettings
from tradeguard.settings import Env, SettingsError
from tradeguard.storage.redis import RedisConfig

__all__ = [
    "ALGORITHMS",
    "DEFAULT_HSTS",
    "DEFAULT_ROUTE_PERMISSIONS",
    "LockoutSettings",
    "Settings",
]

#: A permission's form (services/auth/rbac.py): "<resource>:<action>" or one word; a firm's own service may
#: declare permissions beyond the platform's (rbac.PERMISSIONS), so any well-formed name is accepted.
_PERMISSION: Final = re.compile(r"[a-z][a-z0-9_]{0,31}(:[a-z][a-z0-9_]{0,31})?")
#: The JWT algorithms a deployment may allow (RFC 8725: a fixed list, never `none`, never HS* with a public key).
ALGORITHMS: Final = DEFAULT_ALGORITHMS  # what the kit's JWT verifier supports: the allow-list picks from it
DEFAULT_HSTS: Final = "max-age=63072000; includeSubDomains; preload"
_TRADING: Final = "/tradeguard.trading.v1.TradingService"
DEFAULT_ROUTE_PERMISSIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        f"{_TRADING}/PlaceOrder": "orders:write",
        f"{_TRADING}/CancelOrder": "orders:write",
        f"{_TRADING}/GetOrder": "orders:read",
        f"{_TRADING}/ListOrders": "orders:read",
    }
)
_ROUTE: Final = re.compile(r"/[A-Za-z0-9._~!$&'()+;:@/-]*(/\*)?")
_HSTS_MAX_AGE: Final = re.compile(r"(?:^|;)\s*max-age=(\d{1,10})\s*(?:;|$)", re.IGNORECASE)
_YEAR_S: Final = 365 * 86400


@dataclass(frozen=True)
class LockoutSettings:
    """When failures lock a subject out, and for how long (see the module docstring)."""

    pair_threshold: int = 5
    account_threshold: int = 20
    key_threshold: int = 20
    ip_threshold: int = 100
    window_s: float = 900.0
    base_s: float = 30.0
    max_s: float = 3600.0


@dataclass(frozen=True)
class Settings:
    server: ServerConfig
    database_url: str
    redis: RedisConfig | None = None  # None: hot state in process
    keyvault_target: str = f"127.0.0.1:{lookup('keyvault').port}"
    keyvault_server_name: str = "keyvault"
    credentials_key: str = "credentials"
    jwt_key: str = "auth/jwt"
    issuer: str = "tradeguard-auth"
    audience: str = "tradeguard"
    access_ttl_s: int = 300
    refresh_ttl_s: int = 30 * 86400
    mfa_token_ttl_s: int = 300
    jwt_algorithms: tuple[str, ...] = ("EdDSA",)
    replay_window_s: float = 5.0
    future_skew_s: float = 1.0
    mfa_required_permissions: frozenset[str] = frozenset({"orders:write", "withdraw"})
    totp_issuer: str = "Tradeguard"
    lockout: LockoutSettings = field(default_factory=LockoutSettings)
    route_permissions: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ROUTE_PERMISSIONS)
    hsts: str = DEFAULT_HSTS
    guard_workloads: frozenset[str] = frozenset()  # besides the suite's own services, who may run a guard
    recording: RecordingSettings = field(default_factory=RecordingSettings)  # security events, audited

    @property
    def replay_window_ms(self) -> int:
        return round(self.replay_window_s * 1000)

    @property
    def future_skew_ms(self) -> int:
        return round(self.future_skew_s * 1000)

    @classmethod
    def read(cls, env: Env, common: CommonSettings) -> Settings:
        """The auth service's own settings (see the module docstring) on top of the common ones."""
        lockout = LockoutSettings(
            pair_threshold=env.integer("LOCKOUT_PAIR_THRESHOLD", 5, low=1, high=1000),
            account_threshold=env.integer("LOCKOUT_ACCOUNT_THRESHOLD", 20, low=1, high=10_000),
            key_threshold=env.integer("LOCKOUT_KEY_THRESHOLD", 20, low=1, high=10_000),
            ip_threshold=env.integer("LOCKOUT_IP_THRESHOLD", 100, low=1, high=1_000_000),
            window_s=env.number("LOCKOUT_WINDOW_S", 900.0, low=1.0, high=86400.0),
            base_s=env.number("LOCKOUT_BASE_S", 30.0, low=0.1, high=86400.0),
            max_s=env.number("LOCKOUT_MAX_S", 3600.0, low=0.1, high=7 * 86400.0),
        )
        for key, threshold in (
            ("LOCKOUT_ACCOUNT_THRESHOLD", lockout.account_threshold),
            ("LOCKOUT_KEY_THRESHOLD", lockout.key_threshold),
        ):
            if threshold <= lockout.pair_threshold:
                raise SettingsError(
                    f"{env.name(key)} ({threshold}) must be greater than {env.name('LOCKOUT_PAIR_THRESHOLD')} "
                    f"({lockout.pair_threshold}): one source address must not lock a user or a key out of "
                    "every address"
                )
        if lockout.max_s < lockout.base_s:
            raise SettingsError(
                f"{env.name('LOCKOUT_MAX_S')} ({lockout.max_s:g}) must be at least "
                f"{env.name('LOCKOUT_BASE_S')} ({lockout.base_s:g})"
            )
        return cls(
            server=common.server,
            database_url=common.database_url,
            redis=RedisConfig.from_env(env),
            keyvault_target=env.target("KEYVAULT_TARGET", f"127.0.0.1:{lookup('keyvault').port}"),
            keyvault_server_name=_name(env, "KEYVAULT_SERVER_NAME", "keyvault"),
            credentials_key=_key_name(env, "CREDENTIALS_KEY", "credentials"),
            jwt_key=_key_name(env, "JWT_KEY", "auth/jwt"),
            issuer=_claim(env, "ISSUER", "tradeguard-auth"),
            audience=_claim(env, "AUDIENCE", "tradeguard"),
            access_ttl_s=env.integer("ACCESS_TTL_S", 300, low=30, high=3600),
            refresh_ttl_s=env.integer("REFRESH_TTL_S", 30 * 86400, low=300, high=90 * 86400),
            mfa_token_ttl_s=env.integer("MFA_TOKEN_TTL_S", 300, low=30, high=900),
            jwt_algorithms=_algorithms(env),
            replay_window_s=env.number("REPLAY_WINDOW_S", 5.0, low=0.001, high=60.0),
            future_skew_s=env.number("FUTURE_SKEW_S", 1.0, low=0.0, high=1.0),
            mfa_required_permissions=_permissions(env, "MFA_REQUIRED_PERMISSIONS", "orders:write,withdraw"),
            totp_issuer=_claim(env, "TOTP_ISSUER", "Tradeguard"),
            lockout=lockout,
            route_permissions=_routes(env),
            hsts=_hsts(env),
            guard_workloads=env.workloads("GUARD_WORKLOADS"),
            recording=RecordingSettings.read(env),
        )


def _name(env: Env, key: str, default: str) -> str:
    value = env.text(key, default)
    if re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", value) is None:
        raise SettingsError(f"{env.name(key)} must be a DNS name, got {value!r}")
    return value


def _key_name(env: Env, key: str, default: str) -> str:
    value = env.text(key, default)
    if re.fullmatch(r"[a-z0-9][a-z0-9._/-]{0,127}", value) is None:
        raise SettingsError(
            f"{env.name(key)} must be a key vault key name ([a-z0-9._/-], at most 128), got {value!r}"
        )
    return value


def _claim(env: Env, key: str, default: str) -> str:
    value = env.text(key, default)
    if len(value) > 256 or not value.isprintable() or value != value.strip():
        raise SettingsError(
            f"{env.name(key)} must be printable text of at most 256 characters without outer spaces"
        )
    return value


def _algorithms(env: Env) -> tuple[str, ...]:
    raw = env.text("JWT_ALGORITHMS", "EdDSA")
    names = tuple(dict.fromkeys(part.strip() for part in raw.split(",")))
    if not names or any(name not in ALGORITHMS for name in names):
        raise SettingsError(
            f"{env.name('JWT_ALGORITHMS')} must be a comma-separated list of {', '.join(ALGORITHMS)}, got {raw!r}"
        )
    return names


def _permission(env: Env, key: str, name: str) -> str:
    if _PERMISSION.fullmatch(name) is None:
        raise SettingsError(
            f"{env.name(key)}: {name!r} is not a permission (<resource>:<action> or one word, lowercase, e.g. "
            "orders:write)"
        )
    return name


def _permissions(env: Env, key: str, default: str) -> frozenset[str]:
    raw = env.text(key, default).strip()
    if raw == "none":
        return frozenset()
    return frozenset(_permission(env, key, part.strip()) for part in raw.split(","))


def _routes(env: Env) -> Mapping[str, str]:
    raw = env.raw("ROUTE_PERMISSIONS")
    if raw is None:
        return DEFAULT_ROUTE_PERMISSIONS
    routes: dict[str, str] = {}
    for entry in raw.split(","):
        route, sep, permission = entry.strip().partition("=")
        route, permission = route.strip(), permission.strip()
        if not sep or _ROUTE.fullmatch(route) is None or "*" in route.removesuffix("/*"):
            raise SettingsError(
                f"{env.name('ROUTE_PERMISSIONS')}: each entry is <path>=<permission> or <prefix>/*=<permission>, "
                f"got {entry.strip()!r}"
            )
        if route in routes:
            raise SettingsError(f"{env.name('ROUTE_PERMISSIONS')}: {route!r} is given twice")
        routes[route] = _permission(env, "ROUTE_PERMISSIONS", permission) if permission else ""
    return MappingProxyType(routes)


def _hsts(env: Env) -> str:
    value = env.text("HSTS", DEFAULT_HSTS)
    match = _HSTS_MAX_AGE.search(value)
    if match is None or int(match.group(1)) < _YEAR_S or not value.isprintable():
        raise SettingsError(
            f"{env.name('HSTS')} must be a Strict-Transport-Security value with max-age of at least {_YEAR_S} "
            f"(one year), got {value!r}"
        )
    return value
