"""The auth service as the runner starts it: `python -m services.auth`, its settings from the environment, both
gRPC services (its own and Envoy's Authorization) on one mutual-TLS port, two replicas sharing Redis (nonces and
revocations across replicas), closers at shutdown, and `tradeguard up`'s key creation before auth starts."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from argparse import Namespace
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.auth.hot_memory import MemoryHotState
from services.auth.hot_redis import RedisHotState
from services.auth.model import RevocationKind
from services.auth.service import SERVICE, RevocationFeed
from services.auth.store_postgres import PostgresAuthStore
from services.auth.store_sqlite import SqliteAuthStore
from services.keyvault.service import SERVICE as KEYVAULT
from services.keyvault.settings import Settings as KeyVaultSettings
from tests.services.auth.auth_support import (
    PASSWORD,
    AuthService,
    auth,
    auth_settings,
    create_user,
    enrol,
    next_code,
    signed_request,
    stub,
)
from tests.support import PG_DSN, RedisServer, drop_pg_schema, require_pg, run_module, start_redis
from tests.support_auth import keyvault_settings
from tradeguard import registry
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.cli.up_cmd import Child, Supervisor
from tradeguard.guard.revocations import RevocationSet
from tradeguard.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.service import Stores, read_settings
from tradeguard.settings import SettingsError
from tradeguard.storage.redis import RedisConfig, RedisUnavailable
from tradeguard.testing import FakeClock, RunningService, eventually, running_service

__all__ = ["auth"]  # the fixture, imported for pytest

ROOT = Path(__file__).resolve().parents[3]


def python_m(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m services.auth` with `env` added to this process's environment."""
    return run_module("services.auth", *args, env={**os.environ, **(env or {})})


def test_help_prints_usage_and_starts_nothing() -> None:
    done = python_m("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m services.auth")
    assert "tradeguard.auth.v1.AuthService" in done.stdout and "TRADEGUARD_AUTH_PORT" in done.stdout
    refused = python_m("--port", "1")
    assert refused.returncode == 2 and "unknown argument '--port'" in refused.stderr


def test_a_bad_setting_stops_the_service_naming_the_variable(tmp_path: Path) -> None:
    done = python_m(env={"TRADEGUARD_HOME": str(tmp_path), "TRADEGUARD_AUTH_REPLAY_WINDOW_S": "120"})
    assert done.returncode == 2
    assert "TRADEGUARD_AUTH_REPLAY_WINDOW_S must be a finite number between 0.001 and 60" in done.stderr
    assert "Traceback" not in done.stderr


def test_settings_from_the_environment(tmp_path: Path) -> None:
    environ = {"TRADEGUARD_HOME": str(tmp_path), "TRADEGUARD_AUTH_ISSUER": "https://auth.example"}
    settings = read_settings(SERVICE, environ)
    assert settings.server.name == "auth" and settings.server.port == registry.lookup("auth").port == 50051
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'auth.db'}"
    assert settings.issuer == "https://auth.example" and settings.redis is None
    with pytest.raises(SettingsError, match="TRADEGUARD_AUTH_DATABASE_URL"):
        read_settings(
            SERVICE, {"TRADEGUARD_HOME": str(tmp_path), "TRADEGUARD_AUTH_DATABASE_URL": "mysql://x"}
        )


def test_auth_is_in_the_suite_after_the_key_vault() -> None:
    assert registry.SUITE.index("keyvault") < registry.SUITE.index("auth") < registry.SUITE.index("trading")


async def test_both_services_on_one_port_with_health_and_reflection(auth: AuthService) -> None:
    async with auth.channel("ops") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("tradeguard.auth.v1.AuthService", "envoy.service.auth.v3.Authorization"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = set()
        async for answer in answers:
            names |= {service.name for service in answer.list_services_response.service}
        assert {"tradeguard.auth.v1.AuthService", "envoy.service.auth.v3.Authorization"} <= names


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    try:
        await eventually(server.answers, within_s=10)
        yield server
    finally:
        server.stop()


async def test_two_replicas_share_redis_nonces_and_revocations(
    keyvault: RunningService[KeyVaultSettings, Any], pki_paths: pki.PkiPaths, redis_server: RedisServer
) -> None:
    """Two auth replicas on one record store and one Redis: a nonce spent at one is a replay at the other, and a
    key revoked at one is streamed by the other at once."""
    shared = auth_settings(keyvault, redis=RedisConfig.from_url(f"redis://127.0.0.1:{redis_server.port}"))
    async with (
        running_service(SERVICE, shared, pki_paths) as one,
        running_service(SERVICE, replace(shared), pki_paths) as two,
    ):
        assert isinstance(one.running.assembly.closers[0].__self__, RedisHotState)  # type: ignore[attr-defined]
        async with (
            one.channel("ops") as ops_one,
            one.channel("trading") as guard_one,
            two.channel("trading") as guard_two,
        ):
            user = await create_user(stub(ops_one), "lena")
            created = await stub(ops_one).CreateApiKey(
                pb.CreateApiKeyRequest(
                    user_id=user.user_id, kind=pb.API_KEY_KIND_HMAC, scopes=["orders:write"]
                ),
                timeout=10,
            )
            key_id, secret = created.key.key_id, created.secret
            stream = stub(guard_two).WatchRevocations(pb.WatchRevocationsRequest(), timeout=60)
            await asyncio.wait_for(stream.initial_metadata(), 10)

            request = signed_request(key_id, secret)
            at_one = await stub(guard_one).VerifySignedRequests(
                pb.VerifySignedRequestsRequest(requests=[request]), timeout=10
            )
            at_two = await stub(guard_two).VerifySignedRequests(
                pb.VerifySignedRequestsRequest(requests=[request]), timeout=10
            )
            assert at_one.results[0].HasField("principal")
            assert not at_two.results[0].HasField("principal")  # the nonce was spent at the other replica

            started = time.monotonic()
            await stub(ops_one).RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key_id), timeout=10)
            while True:
                message = await asyncio.wait_for(stream.read(), 10)
                assert isinstance(message, pb.WatchRevocationsResponse)
                if message.WhichOneof("revoked") is not None:
                    break
            assert message.key_id == key_id and time.monotonic() - started < 1.0
            stream.cancel()


async def test_in_process_hot_state_by_default_and_closed_at_shutdown(
    keyvault: RunningService[KeyVaultSettings, Any], pki_paths: pki.PkiPaths
) -> None:
    async with running_service(SERVICE, auth_settings(keyvault), pki_paths) as running:
        hot = running.running.assembly.closers[0].__self__  # type: ignore[attr-defined]
        assert isinstance(hot, MemoryHotState)
        await hot.claim_nonce("k", "n" * 16, 1_000_000)
    with pytest.raises(RuntimeError, match="closed"):  # the closer ran
        await hot.claim_nonce("k", "m" * 16, 1_000_000)


async def test_an_unreachable_redis_stops_the_start_and_leaks_nothing(
    keyvault: RunningService[KeyVaultSettings, Any], pki_paths: pki.PkiPaths, tmp_path: Path
) -> None:
    settings = auth_settings(keyvault, redis=RedisConfig.from_url("redis://127.0.0.1:1?connect_timeout=0.5"))
    tasks = len(asyncio.all_tasks())
    with pytest.raises(RedisUnavailable):
        async with running_service(SERVICE, settings, pki_paths):
            pytest.fail("started without its Redis")
    assert len(asyncio.all_tasks()) == tasks
    # the store was closed: the same database opens again
    async with (
        running_service(SERVICE, auth_settings(keyvault), pki_paths) as running,
        running.channel("ops") as ops,
    ):
        assert (await stub(ops).ListRoles(pb.ListRolesRequest(), timeout=10)).roles


async def test_up_creates_the_auth_keys_as_ops_idempotently(
    pki_paths: pki.PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tradeguard up` creates the auth service's keys on a fresh key vault before starting auth (and a second
    run leaves them as they are), and tells auth where the vault listens."""
    monkeypatch.delenv("TRADEGUARD_AUTH_KEYVAULT_TARGET", raising=False)
    home = pki_paths.home
    fresh = keyvault_settings(home, "a fresh vault for tradeguard up", name="fresh-keyvault")
    args = Namespace(
        home=home,
        cert_hours=24.0,
        check_seconds=30.0,
        ready_timeout=60.0,
        max_fast_crashes=5,
        stable_seconds=60.0,
    )
    async with running_service(KEYVAULT, fresh, pki_paths) as keyvault:
        supervisor = Supervisor(args, [registry.lookup("keyvault"), registry.lookup("auth")])
        supervisor.children["keyvault"] = Child(registry.lookup("keyvault"), keyvault.port, 0)
        async with keyvault.channel("ops") as channel:
            keys = keyvault_pb2_grpc.KeyVaultServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await keys.GetKey(keyvault_pb2.GetKeyRequest(name="auth/jwt"), timeout=10)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            await supervisor.ensure_auth_keys()
            await supervisor.ensure_auth_keys()  # again: ALREADY_EXISTS is success
            for name, kind in (
                ("credentials", keyvault_pb2.KEY_TYPE_AES256_GCM),
                ("auth/jwt", keyvault_pb2.KEY_TYPE_ED25519),
            ):
                key = (await keys.GetKey(keyvault_pb2.GetKeyRequest(name=name), timeout=10)).key
                assert (
                    key.type == kind and key.latest_version == 1
                )  # created once, not rotated by a second run
        env = supervisor.child_env(Child(registry.lookup("auth"), 50051, 51051))
        assert env["TRADEGUARD_AUTH_KEYVAULT_TARGET"] == f"127.0.0.1:{keyvault.port}"
        # and a guarded service where this suite's auth listens
        supervisor.children["auth"] = Child(registry.lookup("auth"), 41051, 42051)
        trading = supervisor.child_env(Child(registry.lookup("trading"), 50055, 51055))
        assert trading["TRADEGUARD_TRADING_AUTH_TARGET"] == "127.0.0.1:41051"
        monkeypatch.setenv("TRADEGUARD_TRADING_AUTH_TARGET", "10.0.0.9:50051")  # an operator's setting wins
        assert supervisor.child_env(Child(registry.lookup("trading"), 1, 2))[
            "TRADEGUARD_TRADING_AUTH_TARGET"
        ] == ("10.0.0.9:50051")
        # the key vault and auth record their security events in this suite's audit service, planned to start
        # after the vault: its port is known from the plan before it is spawned
        supervisor.planned = {"audit": Child(registry.lookup("audit"), 41053, 42053)}
        for name in ("keyvault", "auth"):
            env = supervisor.child_env(Child(registry.lookup(name), 1, 2))
            assert env[f"TRADEGUARD_{name.upper()}_AUDIT_TARGET"] == "127.0.0.1:41053"
        # the monitor reads the audit log and acts through auth and trading: all three of this suite's
        supervisor.planned |= {
            "auth": Child(registry.lookup("auth"), 41051, 42051),
            "trading": Child(registry.lookup("trading"), 41055, 42055),
        }
        monitor = supervisor.child_env(Child(registry.lookup("monitor"), 1, 2))
        assert {
            k: v for k, v in monitor.items() if k.startswith("TRADEGUARD_MONITOR_") and k.endswith("_TARGET")
        } == {
            "TRADEGUARD_MONITOR_AUDIT_TARGET": "127.0.0.1:41053",
            "TRADEGUARD_MONITOR_AUTH_TARGET": "127.0.0.1:41051",
            "TRADEGUARD_MONITOR_TRADING_TARGET": "127.0.0.1:41055",
        }


async def test_the_check_revocation_feed_applies_revocations_and_fails_closed() -> None:
    """The revocation set behind Check is fed from the hot state in process; when the hot state fails, the set
    counts as down, so tokens are refused once the outage budget has passed (the guards' rule)."""
    clock = FakeClock()
    hot = MemoryHotState(clock)
    revocations = RevocationSet(clock, max_outage_s=1.0)
    feed = RevocationFeed(hot, revocations, wait_s=0.01)
    assert revocations.unusable() == "revocation stream never connected"
    await feed.sync()
    assert revocations.unusable() is None
    issued = clock.now_us
    clock.advance_s(1)
    await hot.publish_revocation(RevocationKind.USER, "usr_1", clock.now_us, clock.now_us + 300_000_000)
    await feed.sync()
    assert revocations.token_revoked("jti-1", None, "usr_1", issued) == "user's tokens revoked"
    assert revocations.token_revoked("jti-2", None, "usr_1", clock.now_us + 1) is None  # issued afterwards
    await hot.close()  # the hot state fails from now on
    running = asyncio.create_task(feed.run())
    await eventually(lambda: not revocations.is_up)
    clock.advance_s(2)
    assert revocations.unusable() == "revocation stream down too long"
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running


async def test_production_backends_postgresql_and_redis_shared_by_two_replicas(
    keyvault: RunningService[KeyVaultSettings, Any], pki_paths: pki.PkiPaths, redis_server: RedisServer
) -> None:
    """Records in PostgreSQL and hot state in Redis, two replicas: a user made at one logs in at the other, a
    TOTP code accepted at one is refused at the other, and a refresh token spent at one and reused at the other
    revokes its family for both."""
    require_pg()
    schema = f"tg_auth_svc_{secrets.token_hex(4)}"
    declaration = replace(
        SERVICE,
        stores=Stores(
            sqlite=SqliteAuthStore.open,
            postgres=lambda dsn: PostgresAuthStore.open(dsn, schema=schema),
        ),
    )
    settings = auth_settings(
        keyvault,
        database_url=PG_DSN,
        redis=RedisConfig.from_url(f"redis://127.0.0.1:{redis_server.port}"),
    )
    try:
        async with (
            running_service(declaration, settings, pki_paths) as one,
            running_service(declaration, replace(settings), pki_paths) as two,
            one.channel("ops") as ops_channel,
            two.channel("ops") as other_channel,
        ):
            assert isinstance(one.running.store, PostgresAuthStore)
            ops, other = stub(ops_channel), stub(other_channel)
            await create_user(ops, "pat")
            totp, _ = await enrol(other, "pat")  # enrolled at the other replica
            code = next_code(totp)
            first = await ops.Login(pb.LoginRequest(username="pat", password=PASSWORD), timeout=10)
            tokens = (
                await ops.VerifyMfa(
                    pb.VerifyMfaRequest(mfa_token=first.mfa_token, totp_code=code), timeout=10
                )
            ).tokens
            again = await other.Login(pb.LoginRequest(username="pat", password=PASSWORD), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as reused_code:  # the same code at the other replica
                await other.VerifyMfa(
                    pb.VerifyMfaRequest(mfa_token=again.mfa_token, totp_code=code), timeout=10
                )
            assert reused_code.value.code() == grpc.StatusCode.UNAUTHENTICATED
            fresh = (
                await ops.RefreshToken(pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10)
            ).tokens
            with pytest.raises(grpc.aio.AioRpcError) as reused:
                await other.RefreshToken(
                    pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10
                )
            assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as family:
                await ops.RefreshToken(pb.RefreshTokenRequest(refresh_token=fresh.refresh_token), timeout=10)
            assert family.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        drop_pg_schema(schema)
