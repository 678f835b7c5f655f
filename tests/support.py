"""Helpers the tests share (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlparse

import grpc
import psycopg
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from tradeguard import signing, testing
from tradeguard.audit.recording import RecordingSettings
from tradeguard.auth.v1 import auth_pb2 as auth_pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.guard.client import ApiKeyCredentials
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.service import read_settings
from tradeguard.testing import RunningService, eventually, running_service

# the kit's: never the same port twice in one session (the kernel can offer one port to two askings in a row)
free_port = testing.free_port


def openssl_handshake(port: int, paths: pki.PkiPaths, name: str, version: str) -> str:
    """`openssl s_client -<version>` (tls1_2 / tls1_3) presenting NAME's certificate; the combined output.

    A refused handshake exits non-zero; the caller reads the negotiated "Protocol version" (or its absence)."""
    cert, key, ca = str(paths.cert(name)), str(paths.key(name)), str(paths.ca_bundle)
    identity = ["-cert", cert, "-cert_chain", cert, "-key", key, "-CAfile", ca]
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", f"-{version}", *identity],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return out.stdout + out.stderr


# --- PostgreSQL: the machine's real server; each test works in a schema of its own -------------------------

DEFAULT_PG_DSN = "postgresql://127.0.0.1:5432/test?user=postgres"
PG_DSN = os.environ.get("TRADEGUARD_TEST_PG_DSN") or DEFAULT_PG_DSN


@functools.cache
def _pg_unreachable() -> str:
    """Empty when PostgreSQL answers, else why not (checked once per session)."""
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        return f"PostgreSQL at {PG_DSN} unreachable: {error}"
    return ""


def require_pg() -> None:
    """Skip when PostgreSQL is unreachable on a developer's machine; fail when TRADEGUARD_TEST_PG_DSN is set
    (CI sets it, so the PostgreSQL tests can never be silently skipped there)."""
    reason = _pg_unreachable()
    if reason:
        if os.environ.get("TRADEGUARD_TEST_PG_DSN"):
            pytest.fail(reason)
        pytest.skip(reason)


def drop_pg_schema(schema: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as pg:
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


class _Closable(Protocol):
    async def close(self) -> None: ...


S = TypeVar("S", bound=_Closable)
B = TypeVar("B", bound="Database")


class Database:
    """One test's database: a SQLite file in tmp_path or a fresh PostgreSQL schema. A service's fixture subclasses
    it with an `open()` of its store (which may be called again, a restart, and sees the same data)."""

    def __init__(self, kind: str, tmp_path: Path, sqlite_name: str, schema_prefix: str) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.path = tmp_path / sqlite_name
        self.schema = f"{schema_prefix}_{secrets.token_hex(6)}"
        self._open: list[_Closable] = []

    def opened(self, store: S) -> S:
        """Register a store this database opened, so that `aclose` closes it."""
        self._open.append(store)
        return store

    def execute(self, statement: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Raw SQL outside the store: `{schema}.` names the test schema (PostgreSQL) and `%s` the parameters."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                return conn.execute(statement.replace("{schema}.", "").replace("%s", "?"), params).fetchall()
            finally:
                conn.close()
        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            query = sql.SQL(statement).format(schema=sql.Identifier(self.schema))
            cur = pg.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    async def aclose(self) -> None:
        for store in self._open:
            await store.close()
        if self.kind == "postgres":
            drop_pg_schema(self.schema)


@contextlib.asynccontextmanager
async def open_database(make: Callable[[str, Path], B], kind: str, tmp_path: Path) -> AsyncIterator[B]:
    """The body of a `backend` fixture parametrised over sqlite and postgres: PostgreSQL checked first (skip or
    fail, see `require_pg`), every store closed and the schema dropped after the test."""
    if kind == "postgres":
        require_pg()
    database = make(kind, tmp_path)
    try:
        yield database
    finally:
        await database.aclose()


# --- Redis: servers a test starts itself (the machine's own Redis is at 127.0.0.1:6379) ---------------------


@dataclass
class RedisServer:
    """One `redis-server` process on a loopback port, started by a test and stopped by it."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def answers(self, **options: Any) -> bool:
        """PING answered (options go to redis.Redis: ssl settings for a TLS-only server); a server that exited
        fails the test at once, with the end of its log."""
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else "(no log)"
            raise AssertionError(
                f"redis-server on port {self.port} exited ({self.process.returncode}): {tail}"
            )
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, **options) as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(directory: Path, *args: str, port: int | None = None, tls: bool = False) -> RedisServer:
    """Start `redis-server` on 127.0.0.1 (`port`, or a free one; with `tls` it is the TLS port and there is no
    plain one, and `args` must give the certificates) with no persistence, plus `args`; the caller waits until
    it `answers` and always calls `stop`."""
    port = free_port() if port is None else port
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"redis-{port}.log"
    ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    command = ["redis-server", "--bind", "127.0.0.1", *ports, "--dir", str(directory)]
    command += ["--save", "", "--appendonly", "no", "--logfile", str(log), *args]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return RedisServer(port, process, log)


def free_cluster_port() -> int:
    """A free loopback port for a cluster node: at most 55535, with its cluster bus port (+10000) free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextlib.asynccontextmanager
async def redis_cluster(directory: Path, nodes: int = 3) -> AsyncIterator[list[RedisServer]]:
    """A real Redis Cluster of `nodes` primaries on free loopback ports, `cluster_state:ok` on every node before
    it is yielded; every server stopped afterwards."""
    servers: list[RedisServer] = []
    try:
        for _ in range(nodes):
            port = free_cluster_port()
            servers.append(
                start_redis(
                    directory,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    port=port,
                )
            )
        await eventually(lambda: all(server.answers() for server in servers), within_s=30)
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers)]
        create += ["--cluster-replicas", "0", "--cluster-yes"]
        done = await asyncio.to_thread(subprocess.run, create, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")

        def cluster_ok() -> bool:
            for server in servers:
                try:
                    with redis.Redis(port=server.port, socket_timeout=0.5) as r:
                        if r.cluster("INFO").get("cluster_state") != "ok":
                            return False
                except (redis.RedisError, OSError):
                    return False
            return True

        await eventually(cluster_ok, within_s=30)
        yield servers
    finally:
        for server in servers:
            server.stop()


# --- the real rate-limit service in process ------------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]  # the repository
PACKAGED_LIMITS = ROOT / "services" / "ratelimit" / "limits.yaml"


def run_module(
    module: str, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m <module> ARGS` run to its end from the repository root, its output captured (`env`: the whole
    environment, by default this process's); a hang fails after 120 s."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env=dict(os.environ if env is None else env),
    )


@contextlib.asynccontextmanager
async def running_ratelimit(paths: pki.PkiPaths, limits: str) -> AsyncIterator[RunningService[Any, Any]]:
    """The real rate-limit service (in process, its counters in process: `make run`'s default) on a free port,
    with `limits` (YAML) as its limits file; its mesh policy lets `trading` check quotas and `edge` call Envoy's
    RLS."""
    from services.ratelimit.service import SERVICE as RATELIMIT

    limits_file = paths.home / "config" / "limits.yaml"
    limits_file.parent.mkdir(parents=True, exist_ok=True)
    limits_file.write_text(limits)
    environ = {
        "TRADEGUARD_HOME": str(paths.home),
        "TRADEGUARD_RATELIMIT_PORT": "0",
        "TRADEGUARD_RATELIMIT_LIMITS_FILE": str(limits_file),
    }
    async with running_service(RATELIMIT, read_settings(RATELIMIT, environ), paths) as service:
        yield service


# --- the real key vault, auth and rate-limit services, started once per session as processes ------------

AUTH_PASSWORD = "correct horse trading staple"
# The workloads of the session's PKI: tests/conftest.py's, the rate limiter, the audit service, a firm's trading bot,
# the guard tests' echo service.
SESSION_WORKLOADS = (
    "trading",
    "ops",
    "monitor",
    "edge",
    "keyvault",
    "auth",
    "ratelimit",
    "audit",
    "trading-client",
    "echo",
)
# Workloads beyond the suite's own services that the session's auth, rate-limit and audit services let run a guard.
GUARD_WORKLOADS = ("echo", "desk")
# A key vault or auth service started in process by a test that is not about recording: its security events are
# not recorded (tests/tradeguard/audit/test_recording.py and the session's processes record them for real).
NOT_RECORDED = RecordingSettings(enabled=False)

# The limits of the session's rate-limit service (its process reads them from `<home>/config/limits-test.yaml`).
# `standard` (the default tier: any key without a tier, "default", "pro", ..., and every bearer-token user) is
# generous, so that no ordinary test ever meets it; its per-day limits count exactly what a test did (nothing
# leaves a day's window during a test). `tight` (TIGHT_TIER, keys created with that tier) is for the quota tests:
# hour-long windows, so that a test's count never depends on how fast the machine runs it. Collect weighs 20 in
# the `heavy` group, beyond `tight`'s limit of 5: a tight key's Collect can never pass.
TIGHT_TIER = "tight"
TIGHT_REQUESTS_PER_HOUR = 10
TIGHT_ORDERS_PER_HOUR = 3
LIST_ORDERS_WEIGHT = 5
TEST_LIMITS = f"""\
version: 1
default_tier: standard
operations:
  default: {{requests: 1}}
  /tradeguard.trading.v1.TradingService/PlaceOrder: {{requests: 1, orders: 1}}
  /tradeguard.trading.v1.TradingService/CancelOrder: {{requests: 1, orders: 1}}
  /tradeguard.trading.v1.TradingService/ListOrders: {{requests: {LIST_ORDERS_WEIGHT}}}
  /tradeguard.echo.v1.EchoService/Collect: {{requests: 1, heavy: 20}}
tiers:
  standard:
    requests:
      - {{name: per-second, limit: 1000000, window: 1s}}
      - {{name: per-day, limit: 1000000000, window: 1d}}
    orders:
      - {{name: per-second, limit: 1000000, window: 1s}}
      - {{name: per-day, limit: 1000000000, window: 1d}}
    heavy: []
  {TIGHT_TIER}:
    requests:
      - {{name: per-hour, limit: {TIGHT_REQUESTS_PER_HOUR}, window: 1h}}
      - {{name: per-day, limit: 1000, window: 1d}}
    orders:
      - {{name: per-hour, limit: {TIGHT_ORDERS_PER_HOUR}, window: 1h}}
    heavy:
      - {{name: per-hour, limit: 5, window: 1h}}
"""


def _service_env(home: Path, **own: str) -> dict[str, str]:
    """The process environment of a service under `home`: ours minus any inherited TRADEGUARD_ setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
    env["TRADEGUARD_HOME"] = str(home)
    env.update(own)
    return env


def _spawn(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:  # a file, not a pipe: a full pipe would block the service
        return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=out)


async def wait_healthy(
    proc: subprocess.Popen[bytes], target: str, name: str, workload: tls.Workload, log: Path
) -> None:
    """Until the service at `target` (certificate name `name`) reports SERVING over mutual TLS; fails at once
    (with its log) if the process exits."""

    async def serving() -> bool:
        try:
            async with MeshChannel(target, name, workload) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.aio.AioRpcError:
            return False

    state = {"up": False}
    checking: set[asyncio.Task[None]] = set()

    async def check() -> None:
        state["up"] = await serving()

    def up() -> bool:
        assert proc.poll() is None, f"{name} exited during start-up: {log.read_text()[-4000:]}"
        if not state["up"] and not checking:
            task = asyncio.ensure_future(check())
            checking.add(task)
            task.add_done_callback(checking.discard)
        return state["up"]

    await eventually(up, 60)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    stop_processes([proc])


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each (together: their drains overlap), then SIGKILL to any not exited within 10 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class AuthServices:
    """The real key vault and auth service running as processes (as production starts them) under `paths.home`;
    the PKI of `paths` is the one every per-test copy (tests/conftest.py `pki_paths`) shares."""

    paths: pki.PkiPaths
    keyvault_target: str
    auth_target: str
    keyvault: subprocess.Popen[bytes]
    auth: subprocess.Popen[bytes]
    ratelimit_target: str = ""  # the rate-limit service (TEST_LIMITS), in process counters
    ratelimit: subprocess.Popen[bytes] | None = None
    audit_target: str = ""  # the audit service (its log `<home>/data/audit.db`), recording the guards' calls
    audit: subprocess.Popen[bytes] | None = None

    def audit_channel(self, caller: str = "ops", target: str | None = None) -> MeshChannel:
        """A mutual-TLS channel to the session's audit service (or the one at `target`) as `caller`."""
        return MeshChannel(target or self.audit_target, "audit", tls.Workload.of(self.paths, caller))

    def start_audit(
        self, name: str, *, port: int | None = None, extra: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """An audit process (`python -m services.audit`) on this key vault (its checkpoint key `audit/checkpoint`
        created by `auth_processes`), its log `<home>/data/<name>.db`, on `port` or a free one, the guard tests'
        workloads allowed to record; the process and its target. The caller waits for it (`wait_healthy`) and
        stops it (`stop_process`); started again with the same name and port it reopens the same log."""
        home = self.paths.home
        port = free_port() if port is None else port
        env = _service_env(
            home,
            TRADEGUARD_AUDIT_PORT=str(port),
            TRADEGUARD_AUDIT_KEYVAULT_TARGET=self.keyvault_target,
            TRADEGUARD_AUDIT_DATABASE_URL=f"sqlite:///{home / 'data' / f'{name}.db'}",
            TRADEGUARD_AUDIT_GRACE_S="0",
            TRADEGUARD_AUDIT_GUARD_WORKLOADS=",".join(GUARD_WORKLOADS),
            **(extra or {}),
        )
        return _spawn("services.audit", env, home / f"{name}.log"), f"127.0.0.1:{port}"

    def channel(self, caller: str = "ops") -> MeshChannel:
        """A mutual-TLS channel to the auth service as workload `caller`."""
        return MeshChannel(self.auth_target, "auth", tls.Workload.of(self.paths, caller))

    def ratelimit_channel(self, caller: str = "ops", target: str | None = None) -> MeshChannel:
        """A mutual-TLS channel to the session's rate-limit service (or the one at `target`) as `caller`."""
        return MeshChannel(target or self.ratelimit_target, "ratelimit", tls.Workload.of(self.paths, caller))

    def start_ratelimit(
        self,
        name: str,
        *,
        limits: str = TEST_LIMITS,
        port: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[subprocess.Popen[bytes], str]:
        """A rate-limit process (`python -m services.ratelimit`) reading `limits` from `<home>/config/<name>.yaml`,
        its counters in process, on `port` or a free one, the guard tests' workloads allowed to check quotas;
        the process and its target. The caller waits for it (`wait_healthy`) and stops it (`stop_process`)."""
        home = self.paths.home
        limits_file = home / "config" / f"{name}.yaml"
        limits_file.parent.mkdir(parents=True, exist_ok=True)
        limits_file.write_text(limits)
        port = free_port() if port is None else port
        env = _service_env(
            home,
            TRADEGUARD_RATELIMIT_PORT=str(port),
            TRADEGUARD_RATELIMIT_LIMITS_FILE=str(limits_file),
            TRADEGUARD_RATELIMIT_GRACE_S="0",
            TRADEGUARD_RATELIMIT_GUARD_WORKLOADS=",".join(GUARD_WORKLOADS),
            **(extra or {}),
        )
        return _spawn("services.ratelimit", env, home / f"{name}.log"), f"127.0.0.1:{port}"

    def vault_channel(self, caller: str = "ops") -> MeshChannel:
        return MeshChannel(self.keyvault_target, "keyvault", tls.Workload.of(self.paths, caller))

    def start_auth(
        self,
        name: str,
        extra: dict[str, str] | None = None,
        *,
        module: str = "services.auth",
        port: int | None = None,
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Another auth process (`python -m <module>`) on this key vault: its own database `<name>.db`, `port` or
        a free one, GUARD_WORKLOADS allowed to run a guard, `extra` environment; the process and its target. The caller waits for it (`wait_healthy`)
        and stops it (`stop_process`)."""
        home = self.paths.home
        port = free_port() if port is None else port
        env = _service_env(
            home,
            TRADEGUARD_AUTH_PORT=str(port),
            TRADEGUARD_AUTH_KEYVAULT_TARGET=self.keyvault_target,
            TRADEGUARD_AUTH_DATABASE_URL=f"sqlite:///{home / 'data' / f'{name}.db'}",
            TRADEGUARD_AUTH_GRACE_S="0",
            # a firm's own guarded services: the guard tests' echo service, examples/guarded_service.py's desk
            TRADEGUARD_AUTH_GUARD_WORKLOADS=",".join(GUARD_WORKLOADS),
            # its security events recorded by the session's audit service (recording off without one)
            **(
                {"TRADEGUARD_AUTH_AUDIT_TARGET": self.audit_target}
                if self.audit_target
                else {"TRADEGUARD_AUTH_AUDIT": "false"}
            ),
            **(extra or {}),
        )
        return _spawn(module, env, home / f"{name}.log"), f"127.0.0.1:{port}"


@contextlib.contextmanager
def auth_processes(paths: pki.PkiPaths) -> Iterator[AuthServices]:
    """`python -m services.keyvault` (its passphrase a 0600 _FILE secret, the auth service's keys and the audit
    checkpoint key created as `ops`), `python -m services.auth` (GUARD_WORKLOADS may run a guard against it),
    `python -m services.ratelimit` (TEST_LIMITS; GUARD_WORKLOADS may check quotas) and `python -m services.audit`
    (GUARD_WORKLOADS may record) on free loopback ports under `paths.home`, each waited for until its health is
    SERVING; all terminated on exit, whatever happened."""
    from services.auth.vault_client import ensure_keys
    from tradeguard.keyvault.signer import ensure_key
    from tradeguard.keyvault.v1 import keyvault_pb2

    home = paths.home
    (home / "data").mkdir(parents=True, exist_ok=True)
    passphrase = home / "keyvault.passphrase"
    passphrase.write_text(secrets.token_urlsafe(24))
    passphrase.chmod(0o600)
    vault_port, audit_port = free_port(), free_port()
    audit_target = f"127.0.0.1:{audit_port}"
    started: list[subprocess.Popen[bytes]] = []
    try:
        vault_env = _service_env(
            home,
            TRADEGUARD_KEYVAULT_PORT=str(vault_port),
            TRADEGUARD_KEYVAULT_PASSPHRASE_FILE=str(passphrase),
            TRADEGUARD_KEYVAULT_SCRYPT_N=str(2**10),
            TRADEGUARD_KEYVAULT_GRACE_S="0",
            # strict: a rotated key may retire its previous version at once (tests/tradeguard/guard/test_jwt.py)
            TRADEGUARD_KEYVAULT_KEY_FRESHNESS_S="0",
            # key administration and decryptions recorded by the session's audit service
            TRADEGUARD_KEYVAULT_AUDIT_TARGET=audit_target,
        )
        vault_log = home / "keyvault.log"
        vault = _spawn("services.keyvault", vault_env, vault_log)
        started.append(vault)
        vault_target = f"127.0.0.1:{vault_port}"
        # the auth service starts meanwhile: it calls the vault only once asked to seal or sign
        starting = AuthServices(paths, vault_target, "", vault, vault, audit_target=audit_target)
        auth, auth_target = starting.start_auth("auth")
        started.append(auth)
        ratelimit, ratelimit_target = starting.start_ratelimit("ratelimit")
        started.append(ratelimit)
        # the audit service signs its first checkpoint only once the log grows: its key is created meanwhile
        audit, _ = starting.start_audit("audit", port=audit_port)
        started.append(audit)
        ops = tls.Workload.of(paths, "ops")

        async def ready() -> None:
            await wait_healthy(vault, vault_target, "keyvault", ops, vault_log)
            # the vault records the keys' creation in the audit service: it must be up first
            await wait_healthy(audit, audit_target, "audit", ops, home / "audit.log")
            async with MeshChannel(vault_target, "keyvault", ops) as channel:
                await ensure_keys(channel)
                await ensure_key(channel, "audit/checkpoint", keyvault_pb2.KEY_TYPE_ED25519)
            await wait_healthy(auth, auth_target, "auth", ops, home / "auth.log")
            await wait_healthy(ratelimit, ratelimit_target, "ratelimit", ops, home / "ratelimit.log")

        asyncio.run(ready())
        yield AuthServices(
            paths, vault_target, auth_target, vault, auth, ratelimit_target, ratelimit, audit_target, audit
        )
    finally:
        stop_processes(started)


def unique_name(prefix: str = "user") -> str:
    """A username no other test of the session uses (the session's auth service is shared)."""
    return f"{prefix}{secrets.token_hex(6)}"


async def create_auth_user(
    auth: AuthServices, account: str | None = None, roles: tuple[str, ...] = ("trader",)
) -> auth_pb.User:
    """A user (unique name, `AUTH_PASSWORD`) of `account` (default: an account of its own), created by `ops`."""
    username = unique_name()
    async with auth.channel("ops") as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).CreateUser(
            auth_pb.CreateUserRequest(
                username=username,
                password=AUTH_PASSWORD,
                account_id=account or f"acct-{username}",
                roles=roles,
            ),
            timeout=10,
        )
    return reply.user


async def create_api_key(
    auth: AuthServices,
    user_id: str,
    scopes: str = "orders:read orders:write",
    *,
    ed25519_seed: bytes | None = None,
    tier: str = "",
) -> ApiKeyCredentials:
    """An API key of `user_id` with `scopes`, usable from 127.0.0.1: HMAC, or Ed25519 for `ed25519_seed`'s public
    key; created by `ops`."""
    request = auth_pb.CreateApiKeyRequest(
        user_id=user_id,
        kind=auth_pb.API_KEY_KIND_HMAC if ed25519_seed is None else auth_pb.API_KEY_KIND_ED25519,
        scopes=scopes.split(),
        ip_allow_list=["127.0.0.1/32"],
        tier=tier,
    )
    if ed25519_seed is not None:
        request.ed25519_public_key = signing.ed25519_public_key(ed25519_seed)
    async with auth.channel("ops") as channel:
        created = await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(request, timeout=10)
    if ed25519_seed is not None:
        return ApiKeyCredentials(created.key.key_id, ed25519_seed=ed25519_seed)
    return ApiKeyCredentials(created.key.key_id, secret=created.secret)


async def log_in(auth: AuthServices, user: auth_pb.User, caller: str = "ops") -> str:
    """An access token of `user`, logged in for real as workload `caller` (see `log_in_tokens`)."""
    return str((await log_in_tokens(auth, user, caller)).access_token)


async def log_in_tokens(auth: AuthServices, user: auth_pb.User, caller: str = "ops") -> auth_pb.TokenPair:
    """The tokens of `user`, logged in for real as workload `caller` (the access token is bound to its
    certificate): password, and for a user whose roles need a second factor, TOTP enrolment and a code."""
    import pyotp

    async with auth.channel(caller) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        if not user.mfa_required:
            reply = await stub.Login(
                auth_pb.LoginRequest(username=user.username, password=AUTH_PASSWORD), timeout=10
            )
            return reply.tokens
        begun = await stub.BeginTotpEnrollment(
            auth_pb.BeginTotpEnrollmentRequest(username=user.username, password=AUTH_PASSWORD), timeout=10
        )
        totp = pyotp.TOTP(parse_qs(urlparse(begun.otpauth_uri).query)["secret"][0])
        await stub.ConfirmTotpEnrollment(
            auth_pb.ConfirmTotpEnrollmentRequest(
                username=user.username, password=AUTH_PASSWORD, code=totp.now()
            ),
            timeout=10,
        )
        first = await stub.Login(
            auth_pb.LoginRequest(username=user.username, password=AUTH_PASSWORD), timeout=10
        )
        second = await stub.VerifyMfa(
            auth_pb.VerifyMfaRequest(mfa_token=first.mfa_token, totp_code=totp.at(time.time() + 30)),
            timeout=10,
        )
        return second.tokens
