"""The audit service as the runner starts it: `python -m services.audit`, its settings from the environment, its
policy, the real key vault signing its checkpoints, a restart on the same database; `tradeguard up` creates the
checkpoint key as ops and points the service at its key vault.

`running_audit` (used by the servicer's and the checkpoints' tests too): the real key vault (the checkpoint key
created as ops) and the audit service on SQLite in the test's home, both over mutual TLS on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
from argparse import Namespace
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from services.audit import policy
from services.audit.service import SERVICE
from services.audit.settings import Settings
from services.audit.store_postgres import PostgresAuditStore, pruner_role, writer_role
from services.audit.store_sqlite import SqliteAuditStore
from services.keyvault.service import SERVICE as KEYVAULT
from services.keyvault.settings import Settings as KeyVaultSettings
from tests.support import PG_DSN, drop_pg_schema, require_pg, run_module
from tests.support_auth import keyvault_settings, running_keyvault
from tradeguard import registry
from tradeguard.audit import tlog
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.cli.up_cmd import Child, Supervisor
from tradeguard.keyvault.signer import ensure_key
from tradeguard.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import Declaration, Stores, read_settings, start
from tradeguard.settings import SettingsError
from tradeguard.testing import RunningService, running_service

ROOT = Path(__file__).resolve().parents[3]
KEY = "audit/checkpoint"
ORIGIN = "tradeguard.test/audit"
CALL_S = 30.0  # only there so that a hang fails the test instead of stalling it


def audit_settings(home: Path, keyvault: RunningService[Any, Any], **overrides: Any) -> Settings:
    """The audit service's settings for a test: a free port, SQLite in `home/data/audit.db`, the test's key vault,
    a checkpoint every 50 ms while the log grows."""
    settings = Settings(
        server=ServerConfig(name="audit", port=0, home=home, grace_s=1.0),
        database_url=f"sqlite:///{home / 'data' / 'audit.db'}",
        keyvault_target=keyvault.target,
        origin=ORIGIN,
        checkpoint_interval_s=0.05,
    )
    return replace(settings, **overrides)


@dataclass
class Audit:
    """The running audit service and its key vault."""

    service: RunningService[Settings, Any]
    keyvault: RunningService[KeyVaultSettings, Any]
    paths: pki.PkiPaths
    declaration: Declaration[Settings, Any] = SERVICE

    def channel(self, caller: str = "ops") -> grpc.aio.Channel:
        return self.service.channel(caller)

    async def public_keys(self) -> list[bytes]:
        """The checkpoint key's public keys, as an operator reads them from the vault."""
        async with self.keyvault.channel("ops") as channel:
            key = (
                await keyvault_pb2_grpc.KeyVaultServiceStub(channel).GetKey(
                    keyvault_pb2.GetKeyRequest(name=self.service.running.settings.checkpoint_key),
                    timeout=CALL_S,
                )
            ).key
        return [bytes(v.public_key) for v in key.versions if v.version >= key.min_decryption_version]

    async def restart(self, **overrides: Any) -> None:
        """Stop the audit service and start it again on the same database (and the same settings, but a new
        port)."""
        settings = replace(self.service.running.settings, **overrides)
        await self.service.running.stop(grace=0, drain=0)
        self.service = await _start(self.declaration, settings, self.paths)


async def _start(
    declaration: Declaration[Settings, Any], settings: Settings, paths: pki.PkiPaths
) -> RunningService[Settings, Any]:
    return RunningService(await start(declaration, settings), paths)


@contextlib.asynccontextmanager
async def running_audit(
    paths: pki.PkiPaths,
    *,
    create_key: bool = True,
    declaration: Declaration[Settings, Any] = SERVICE,
    **overrides: Any,
) -> AsyncIterator[Audit]:
    pki.issue(paths, "audit")  # not among the session's workloads (tests/support.py)
    vault_settings = keyvault_settings(paths.home, "audit test passphrase", name="audit-keyvault")
    async with running_keyvault(paths, vault_settings) as keyvault:
        if create_key:
            async with keyvault.channel("ops") as ops:
                await ensure_key(ops, KEY, keyvault_pb2.KEY_TYPE_ED25519)
        settings = audit_settings(paths.home, keyvault, **overrides)
        audit = Audit(await _start(declaration, settings, paths), keyvault, paths, declaration)
        try:
            yield audit
        finally:
            await audit.service.running.stop(grace=0, drain=0)


def stub(channel: grpc.aio.Channel) -> audit_pb2_grpc.AuditServiceAsyncStub:
    return audit_pb2_grpc.AuditServiceStub(channel)


def event(event_id: str, **fields: Any) -> pb.Event:
    """A well-formed event (an OK call of PlaceOrder by alice at a fixed time), with `fields` changed."""
    message = pb.Event(
        event_id=event_id,
        time=timestamp_pb2.Timestamp(seconds=1_764_500_000, nanos=123_456_000),
        principal="usr_alice",
        account_id="acct-1",
        api_key_id="tgk_alice",
        caller="spiffe://tradeguard.test/svc/edge",
        source_ip="192.0.2.10",
        method="/tradeguard.trading.v1.TradingService/PlaceOrder",
        resource="ord-1",
        action="order.place",
        outcome=pb.OUTCOME_OK,
        status_code="OK",
        request_id="req-1",
    )
    for name, value in fields.items():
        if isinstance(value, timestamp_pb2.Timestamp):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


async def latest_checkpoint(audit: Audit, at_least: int) -> pb.SignedCheckpoint:
    """The latest checkpoint once it covers `at_least` entries (polled: checkpoints follow appends within 50 ms)."""
    async with audit.channel("ops") as channel, asyncio.timeout(CALL_S):
        audit_stub = stub(channel)
        while True:
            reply = await audit_stub.GetCheckpoint(pb.GetCheckpointRequest(), timeout=CALL_S)
            if reply.HasField("checkpoint") and reply.checkpoint.tree_size >= at_least:
                return reply.checkpoint
            await asyncio.sleep(0.005)


def open_checkpoint(note: str, public_keys: list[bytes]) -> tuple[str, int, bytes]:
    """(origin, size, root) of a signed checkpoint, verified as a C2SP signed note under `public_keys`."""
    return tlog.parse_checkpoint(tlog.open_note(note, ORIGIN, public_keys))


# --- the command and its settings -------------------------------------------------------------------------------


def python_m(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m services.audit` with `env` added to this process's environment."""
    return run_module("services.audit", *args, env={**os.environ, **(env or {})})


def test_help_prints_usage_and_starts_nothing() -> None:
    done = python_m("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m services.audit")
    assert "tradeguard.audit.v1.AuditService" in done.stdout and "TRADEGUARD_AUDIT_PORT" in done.stdout
    refused = python_m("--port", "1")
    assert refused.returncode == 2 and "unknown argument '--port'" in refused.stderr


def test_a_bad_setting_stops_the_service_naming_the_variable(tmp_path: Path) -> None:
    done = python_m(env={"TRADEGUARD_HOME": str(tmp_path), "TRADEGUARD_AUDIT_CHECKPOINT_INTERVAL_S": "5"})
    assert done.returncode == 2
    assert "TRADEGUARD_AUDIT_CHECKPOINT_INTERVAL_S" in done.stderr and "Traceback" not in done.stderr


def test_settings_from_the_environment(tmp_path: Path) -> None:
    home = {"TRADEGUARD_HOME": str(tmp_path)}
    settings = read_settings(SERVICE, home)
    assert settings.server.name == "audit" and settings.server.port == registry.lookup("audit").port == 50053
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'audit.db'}"
    assert (settings.keyvault_target, settings.checkpoint_key) == ("127.0.0.1:50054", KEY)
    assert (settings.origin, settings.checkpoint_interval_s) == ("tradeguard.local/audit", 1.0)
    assert settings.guard_workloads == frozenset()
    assert (settings.retention_days, settings.retention_interval_s) == (2557, 3600.0)
    assert settings.archive_path == tmp_path / "archive" / "audit"
    own = read_settings(
        SERVICE,
        {
            **home,
            "TRADEGUARD_AUDIT_KEYVAULT_TARGET": "vault.internal:7000",
            "TRADEGUARD_AUDIT_CHECKPOINT_KEY": "audit/heads",
            "TRADEGUARD_AUDIT_ORIGIN": "audit.example.com/log",
            "TRADEGUARD_AUDIT_CHECKPOINT_INTERVAL_S": "0.25",
            "TRADEGUARD_AUDIT_GUARD_WORKLOADS": "desk, echo",
            "TRADEGUARD_AUDIT_DATABASE_URL": "postgresql://audit@db/audit",
            "TRADEGUARD_AUDIT_RETENTION_DAYS": "3650",
            "TRADEGUARD_AUDIT_ARCHIVE_DIR": str(tmp_path / "worm"),
            "TRADEGUARD_AUDIT_RETENTION_INTERVAL_S": "60",
        },
    )
    assert (own.retention_days, own.retention_interval_s) == (3650, 60.0)
    assert own.archive_path == tmp_path / "worm"
    assert own.keyvault_target == "vault.internal:7000" and own.checkpoint_key == "audit/heads"
    assert own.origin == "audit.example.com/log" and own.checkpoint_interval_s == 0.25
    assert own.guard_workloads == {"desk", "echo"} and own.database_url == "postgresql://audit@db/audit"
    for variable, value in (
        ("KEYVAULT_TARGET", "no-port"),
        ("CHECKPOINT_KEY", "Audit Key"),
        ("ORIGIN", "has space/audit"),
        ("ORIGIN", "+plus"),
        ("CHECKPOINT_INTERVAL_S", "0"),
        ("CHECKPOINT_INTERVAL_S", "1.5"),
        ("GUARD_WORKLOADS", "Bad_Name"),
        ("DATABASE_URL", "mysql://x"),
        ("RETENTION_DAYS", "0"),
        ("RETENTION_DAYS", "36501"),
        ("RETENTION_DAYS", "7y"),
        ("ARCHIVE_DIR", "   "),
        ("RETENTION_INTERVAL_S", "0.5"),
    ):
        with pytest.raises(SettingsError, match=f"TRADEGUARD_AUDIT_{variable}"):
            read_settings(SERVICE, {**home, f"TRADEGUARD_AUDIT_{variable}": value})


def test_the_policy_denies_by_default() -> None:
    rules = policy.rules()
    service = "/tradeguard.audit.v1.AuditService"
    for method in ("Append", "AppendBatch"):
        assert rules[f"{service}/{method}"] == {"trading", "auth", "keyvault", "ratelimit", "monitor"}
    for method in policy.READ_METHODS:
        assert rules[f"{service}/{method}"] == {"ops", "monitor"}
    assert len(rules) == 9  # every RPC of the proto, nothing else
    names = {m.name for m in pb.DESCRIPTOR.services_by_name["AuditService"].methods}
    assert {rule.rsplit("/", 1)[1] for rule in rules} == names
    wider = policy.rules(frozenset({"desk"}))
    assert wider[f"{service}/Append"] == {"trading", "auth", "keyvault", "ratelimit", "monitor", "desk"}
    assert wider[f"{service}/Query"] == {"ops", "monitor"}


def test_audit_is_in_the_suite_after_the_key_vault_before_its_recorders() -> None:
    suite = registry.SUITE
    assert suite.index("keyvault") < suite.index("audit") < suite.index("auth") < suite.index("trading")


# --- running ------------------------------------------------------------------------------------------------------


async def test_health_reflection_and_a_signed_checkpoint_after_appends(pki_paths: pki.PkiPaths) -> None:
    async with running_audit(pki_paths) as audit, audit.channel("trading") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="tradeguard.audit.v1.AuditService"), timeout=CALL_S
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with audit.channel("ops") as ops:
            empty = await stub(ops).GetCheckpoint(pb.GetCheckpointRequest(), timeout=CALL_S)
            assert not empty.HasField("checkpoint")  # nothing is signed for an empty log
        appended = await stub(channel).AppendBatch(
            pb.AppendBatchRequest(events=[event(f"svc-{i}") for i in range(3)]), timeout=CALL_S
        )
        assert [a.sequence for a in appended.appended] == [0, 1, 2]
        checkpoint = await latest_checkpoint(audit, 3)
        origin, size, root = open_checkpoint(checkpoint.note, await audit.public_keys())
        assert (origin, size, root) == (ORIGIN, 3, checkpoint.root_hash) and checkpoint.tree_size == 3
        leaves = [a.leaf_hash for a in appended.appended]
        assert root == tlog.root(leaves)


async def test_a_restart_keeps_the_log_and_goes_on_from_it(pki_paths: pki.PkiPaths) -> None:
    async with running_audit(pki_paths) as audit:
        async with audit.channel("trading") as channel:
            first = await stub(channel).Append(pb.AppendRequest(event=event("before")), timeout=CALL_S)
        before = await latest_checkpoint(audit, 1)
        await audit.restart()
        async with audit.channel("trading") as channel:
            again = await stub(channel).Append(pb.AppendRequest(event=event("before")), timeout=CALL_S)
            assert again.appended == pb.Appended(
                sequence=0, leaf_hash=first.appended.leaf_hash, created=False
            )
            after = await stub(channel).Append(pb.AppendRequest(event=event("after")), timeout=CALL_S)
            assert after.appended.sequence == 1 and after.appended.created
        checkpoint = await latest_checkpoint(audit, 2)
        keys = await audit.public_keys()
        assert open_checkpoint(before.note, keys)[1] == 1 and open_checkpoint(checkpoint.note, keys)[1] == 2
        async with audit.channel("ops") as ops:
            listed = await stub(ops).ListCheckpoints(pb.ListCheckpointsRequest(), timeout=CALL_S)
            assert [c.tree_size for c in listed.checkpoints] == [1, 2]  # the first survived the restart
            proof = await stub(ops).GetConsistencyProof(
                pb.GetConsistencyProofRequest(first_size=1, second_size=2), timeout=CALL_S
            )
        assert tlog.verify_consistency(1, 2, list(proof.hashes), before.root_hash, checkpoint.root_hash)


async def test_on_postgresql_appends_sign_and_survive_a_restart(pki_paths: pki.PkiPaths) -> None:
    """TRADEGUARD_AUDIT_DATABASE_URL=postgresql://…: the same service on PostgreSQL (a fresh schema)."""
    require_pg()
    schema = f"tg_audit_svc_{secrets.token_hex(4)}"
    declaration = replace(
        SERVICE,
        stores=Stores(
            sqlite=SqliteAuditStore.open, postgres=lambda dsn: PostgresAuditStore.open(dsn, schema=schema)
        ),
    )
    try:
        async with running_audit(pki_paths, declaration=declaration, database_url=PG_DSN) as audit:
            assert isinstance(audit.service.running.store, PostgresAuditStore)
            async with audit.channel("trading") as channel:
                appended = await stub(channel).AppendBatch(
                    pb.AppendBatchRequest(events=[event(f"pg-{i}") for i in range(4)]), timeout=CALL_S
                )
            before = await latest_checkpoint(audit, 4)
            await audit.restart()
            async with audit.channel("trading") as channel:
                await stub(channel).Append(pb.AppendRequest(event=event("pg-4")), timeout=CALL_S)
            after = await latest_checkpoint(audit, 5)
            keys = await audit.public_keys()
            assert open_checkpoint(before.note, keys)[2] == tlog.root(
                [a.leaf_hash for a in appended.appended]
            )
            async with audit.channel("ops") as ops:
                proof = await stub(ops).GetConsistencyProof(
                    pb.GetConsistencyProofRequest(first_size=4, second_size=5), timeout=CALL_S
                )
            assert open_checkpoint(after.note, keys)[1] == 5
            assert tlog.verify_consistency(4, 5, list(proof.hashes), before.root_hash, after.root_hash)
    finally:
        drop_pg_schema(schema)
        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            for role in (writer_role(schema), pruner_role(schema)):
                pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


async def test_up_creates_the_checkpoint_key_and_points_audit_at_its_vault(
    pki_paths: pki.PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tradeguard up` creates the checkpoint key as ops on a fresh key vault before it starts the audit service
    (a second run leaves it as it is), tells the audit service where the vault listens and a guarded service where
    the audit service listens."""
    monkeypatch.delenv("TRADEGUARD_AUDIT_KEYVAULT_TARGET", raising=False)
    monkeypatch.delenv("TRADEGUARD_TRADING_AUDIT_TARGET", raising=False)
    args = Namespace(
        home=pki_paths.home,
        cert_hours=24.0,
        check_seconds=30.0,
        ready_timeout=60.0,
        max_fast_crashes=5,
        stable_seconds=60.0,
    )
    fresh = keyvault_settings(pki_paths.home, "a fresh vault for tradeguard up", name="fresh-keyvault")
    async with running_service(KEYVAULT, fresh, pki_paths) as keyvault:
        supervisor = Supervisor(args, [registry.lookup("keyvault"), registry.lookup("audit")])
        supervisor.children["keyvault"] = Child(registry.lookup("keyvault"), keyvault.port, 0)
        async with keyvault.channel("ops") as channel:
            keys = keyvault_pb2_grpc.KeyVaultServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await keys.GetKey(keyvault_pb2.GetKeyRequest(name=KEY), timeout=CALL_S)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            await supervisor.ensure_service_keys("audit")
            await supervisor.ensure_service_keys("audit")  # again: ALREADY_EXISTS is success
            key = (await keys.GetKey(keyvault_pb2.GetKeyRequest(name=KEY), timeout=CALL_S)).key
            assert key.type == keyvault_pb2.KEY_TYPE_ED25519 and key.latest_version == 1
        env = supervisor.child_env(Child(registry.lookup("audit"), 50053, 51053))
        assert env["TRADEGUARD_AUDIT_KEYVAULT_TARGET"] == f"127.0.0.1:{keyvault.port}"
        assert "TRADEGUARD_AUDIT_AUTH_TARGET" not in env  # not a guarded service
        supervisor.children["audit"] = Child(registry.lookup("audit"), 41053, 42053)
        trading = supervisor.child_env(Child(registry.lookup("trading"), 50055, 51055))
        assert trading["TRADEGUARD_TRADING_AUDIT_TARGET"] == "127.0.0.1:41053"  # its guard's audit stage
