"""`tradeguard audit …`: its arguments and key files; the syslog export received by a REAL syslog listener written
here (an asyncio TCP server reading RFC 6587 octet-counted RFC 5424 frames, and the same over TLS 1.3 with a
certificate of the test's dev PKI); and, end to end, the command line run as a process against the real audit
service (in process, as production starts it, over mutual TLS) signing its checkpoints with the real key vault:
query, tail across a restart of the service, export, and `verify` passing on the live log, then failing, naming
the entry, after an attacker with the SQLite file drops the append-only triggers and alters or deletes an entry;
and a log whose oldest entries retention archived and removed: verified with --archive-dir, an altered archive line
named, and without the archive never a silent success.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import dataclasses
import io
import json
import os
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from psycopg import sql as psql

from services.audit import codec
from services.audit.checkpoints import CheckpointPublisher
from services.audit.core import AuditLog
from services.audit.model import Event, Outcome
from services.audit.retention import Retention
from services.audit.service import SERVICE as AUDIT
from services.audit.settings import DEFAULT_CHECKPOINT_KEY as AUDIT_DEFAULT_KEY
from services.audit.settings import Settings as AuditSettings
from services.audit.store_postgres import PostgresAuditStore, pruner_role, writer_role
from services.audit.store_sqlite import SqliteAuditStore
from tests.services.audit.test_retention import LocalSigner
from tests.support import PG_DSN, Database, free_port, open_database
from tests.support_auth import keyvault_settings, running_keyvault
from tests.tradeguard.audit.test_siem import parse_syslog, record, split_cef
from tradeguard.audit import archive, siem, tlog
from tradeguard.audit.v1 import audit_pb2 as audit_pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.cli import audit_cmd, main
from tradeguard.cli.common import CliError
from tradeguard.keyvault.signer import ensure_key
from tradeguard.keyvault.v1 import keyvault_pb2 as kv_pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import Declaration
from tradeguard.testing import FakeClock, RunningService, running_service

ROOT = Path(__file__).resolve().parents[3]


# --- arguments and key files ----------------------------------------------------------------------------------------


def test_times_are_rfc_3339_or_ages() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert audit_cmd.time_argument("15m", now=now) == now - timedelta(minutes=15)
    assert audit_cmd.time_argument("7d", now=now) == now - timedelta(days=7)
    assert audit_cmd.time_argument("2026-11-30T10:00:00Z") == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert audit_cmd.time_argument("2026-11-30T10:00:00") == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert audit_cmd.time_argument("2026-11-30T11:00:00+01:00") == datetime(2026, 11, 30, 10, tzinfo=UTC)
    with pytest.raises(Exception, match="neither a time"):
        audit_cmd.time_argument("yesterday")


def test_options_are_refused_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, words in (
        (["audit", "tail", "--from", "-1"], "must be 0 or more"),
        (["audit", "query", "--limit", "0"], "must be 1 or more"),
        (["audit", "export", "--since", "1h"], "--until"),
        (["audit", "export", "--since", "1h", "--until", "0s", "--syslog", "nohost"], "is not HOST:PORT"),
        (["audit", "query", "--outcome", "fine"], "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            main.parser().parse_args(argv)
        assert words in capsys.readouterr().err
    args = main.parser().parse_args(["audit", "--as", "monitor", "export", "--since", "1h", "--until", "0s"])
    assert (args.identity, args.format, args.syslog) == ("monitor", "csv", None)
    assert audit_cmd.SyslogTarget("[::1]:6514").host == "::1"


def _ed25519() -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_export_files_for_verify(tmp_path: Path) -> None:
    rows = [record(sequence=i, leaf_hash=bytes([i]) * 32) for i in range(3)]
    as_csv, as_json = tmp_path / "e.csv", tmp_path / "e.json"
    as_csv.write_bytes("".join(siem.csv_lines(rows)).encode())
    as_json.write_text("".join(siem.json_line(r) + "\n" for r in rows))
    expected = {i: bytes([i]) * 32 for i in range(3)}
    assert audit_cmd.read_export(as_csv) == expected and audit_cmd.read_export(as_json) == expected
    for text, words in (
        ('{"sequence": 1}\n', "row 1 has no sequence and leaf_hash"),
        ('{"sequence": 1, "leaf_hash": "00"}\n', "row 1's leaf_hash is not 32 bytes"),
        ("{not json\n", ":1: not a JSON line"),
        ("a,b\n1,2\n", "row 1 has no sequence and leaf_hash"),
    ):
        as_json.write_text(text)
        with pytest.raises(CliError, match=words):
            audit_cmd.read_export(as_json)


def test_public_key_files(tmp_path: Path) -> None:
    _key1, raw1 = _ed25519()
    key2, raw2 = _ed25519()
    _, raw3 = _ed25519()
    name = "tradeguard.local/audit"
    encoded = base64.b64encode(bytes([1]) + raw1).decode()
    vkey = f"{name}+{tlog.key_hash(name, raw1).hex()}+{encoded}"
    pem = key2.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    path = tmp_path / "keys"
    path.write_text(f"# the checkpoint key\n{vkey}\n{pem}\n{base64.b64encode(raw3).decode()}\n")
    assert audit_cmd.read_public_keys(path) == [raw2, raw1, raw3]
    bad_hash = vkey.replace(tlog.key_hash(name, raw1).hex(), "00000000")
    for text, words in (
        (bad_hash, "the verifier key's hash does not match its key"),
        ("not a key", ":1: not a note verifier key"),
        ("", "holds no key"),
        ("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----", "not Ed25519"),
    ):
        path.write_text(text)
        with pytest.raises(CliError, match=words):
            audit_cmd.read_public_keys(path)
    with pytest.raises(CliError, match="cannot read it"):
        audit_cmd.read_public_keys(tmp_path / "missing")


# --- a real syslog receiver -------------------------------------------------------------------------------------


@dataclass
class SyslogReceiver:
    """An RFC 6587 octet-counting receiver (TCP, or TLS 1.3 when given a context): every message it read."""

    context: ssl.SSLContext | None = None
    messages: list[str] = field(default_factory=list)
    tls_versions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    port: int = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        if tls is not None:
            self.tls_versions.append(tls.version())
        try:
            while True:
                try:
                    length = await reader.readuntil(b" ")
                except asyncio.IncompleteReadError as end:
                    if end.partial:
                        self.errors.append(f"a partial frame header {end.partial!r}")
                    break
                digits = length[:-1]
                if not digits.isdigit() or digits.startswith(b"0") or len(digits) > 9:
                    self.errors.append(f"not an octet count: {digits!r}")
                    break
                self.messages.append((await reader.readexactly(int(digits))).decode("utf-8"))
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as error:
            self.errors.append(repr(error))
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SyslogReceiver]:
        server = await asyncio.start_server(self._session, "127.0.0.1", 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


def receiver_tls(paths: pki.PkiPaths) -> ssl.SSLContext:
    pki.issue(paths, "syslog")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(paths.cert("syslog"), paths.key("syslog"))
    return context


def _frames(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        event = record(sequence=i, principal=f"user {i} | = ]\n", outcome="DENIED_QUOTA" if i % 2 else "OK")
        out.append(siem.frame(siem.syslog(event, siem.cef(event), hostname="exporter")))
    return out


async def test_syslog_over_tcp_reaches_a_real_receiver() -> None:
    async with SyslogReceiver().running() as receiver:
        target = audit_cmd.SyslogTarget(f"127.0.0.1:{receiver.port}")
        assert await audit_cmd.send_syslog(_frames(50), target, None) == 50
        await _until(lambda: len(receiver.messages) == 50)
    assert receiver.errors == [] and receiver.tls_versions == []
    for i, message in enumerate(receiver.messages):
        parsed = parse_syslog(message)
        assert parsed["sd"]["tradeguard@32473"]["sequence"] == str(i)
        assert split_cef(parsed["msg"])[1]["suser"] == f"user {i} | = ]\n"


async def test_syslog_over_tls_1_3_checks_the_receiver(pki_paths: pki.PkiPaths, tmp_path: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki_paths.ca_bundle))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    async with SyslogReceiver(receiver_tls(pki_paths)).running() as receiver:
        target = audit_cmd.SyslogTarget(f"127.0.0.1:{receiver.port}")
        assert await audit_cmd.send_syslog(_frames(5), target, context, server_name="syslog") == 5
        await _until(lambda: len(receiver.messages) == 5)
        with pytest.raises(
            ssl.SSLCertVerificationError
        ):  # the receiver's certificate does not name 127.0.0.1
            await audit_cmd.send_syslog(_frames(1), target, context)
        other = tmp_path / "other"
        elsewhere = pki.PkiPaths(other)
        pki.init_ca(elsewhere, "elsewhere.test")
        stranger = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(elsewhere.ca_bundle))
        with pytest.raises(ssl.SSLCertVerificationError):  # nor does another CA vouch for it
            await audit_cmd.send_syslog(_frames(1), target, stranger, server_name="syslog")
    assert receiver.tls_versions[0] == "TLSv1.3" and len(receiver.messages) == 5
    assert [parse_syslog(m)["app"] for m in receiver.messages] == ["tradeguard-audit"] * 5


async def _until(condition: Any, within_s: float = 30.0) -> None:
    from tradeguard.testing import eventually

    await eventually(condition, within_s)


# --- end to end: the command line against the real audit service and key vault --------------------------------------


class AuditDatabase(Database):
    """The audit service's database in a test: a SQLite file, or a fresh PostgreSQL schema (dropped after the
    test with the writer role its migration creates)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        super().__init__(kind, tmp_path, "audit.db", "tg_test_audit_cli")

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}" if self.kind == "sqlite" else PG_DSN

    def declaration(self) -> Declaration[AuditSettings, Any]:
        """The audit service as production declares it, its PostgreSQL store in this test's schema."""
        if self.kind == "sqlite":
            return AUDIT

        async def postgres(dsn: str) -> PostgresAuditStore:
            return await PostgresAuditStore.open(dsn, schema=self.schema, min_size=1, max_size=4)

        return dataclasses.replace(AUDIT, stores=dataclasses.replace(AUDIT.stores, postgres=postgres))

    async def aclose(self) -> None:
        await super().aclose()
        if self.kind == "postgres":
            with psycopg.connect(PG_DSN, autocommit=True) as pg:
                for role in (writer_role(self.schema), pruner_role(self.schema)):
                    pg.execute(psql.SQL("DROP ROLE IF EXISTS {}").format(psql.Identifier(role)))

    def attack(self, statement: str, params: tuple[object, ...]) -> None:
        """What an attacker with the database does: drop the append-only triggers, then change the log directly
        (`{schema}.` and `%s` as in Database.execute)."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as connection:
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger'"
                ).fetchall():
                    connection.execute(f'DROP TRIGGER "{name}"')
        else:
            self.execute("DROP TRIGGER IF EXISTS entries_append_only ON {schema}.entries")
            self.execute("DROP TRIGGER IF EXISTS entries_prune_only ON {schema}.entries")
        self.execute(statement, params)

    def entry_bytes(self, sequence: int) -> bytes:
        return bytes(
            self.execute("SELECT entry_bytes FROM {schema}.entries WHERE sequence = %s", (sequence,))[0][0]
        )


@dataclass
class Suite:
    """The real key vault and audit service, and the environment the command line runs in."""

    paths: pki.PkiPaths
    audit: RunningService[AuditSettings, Any]
    database: AuditDatabase
    env: dict[str, str]
    appended: int = 0

    async def run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """`tradeguard ARGS…` as a process (the services answer meanwhile: they run on this loop)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tradeguard.cli.main",
            *args,
            env=self.env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
        assert process.returncode is not None
        return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())

    async def append(self, count: int, **fields: Any) -> None:
        """`count` events recorded by the trading workload (principals alternate alice and bob)."""
        events = []
        for _ in range(count):
            n = self.appended
            self.appended += 1
            event = audit_pb.Event(
                event_id=f"e2e-{n}",
                outcome=audit_pb.OUTCOME_OK if n % 3 else audit_pb.OUTCOME_DENIED_QUOTA,
                method="/tradeguard.trading.v1.TradingService/PlaceOrder",
                principal="alice" if n % 2 == 0 else "bob",
                account_id="acct-1",
                source_ip="127.0.0.1",
                action="order.place",
                resource=f"ord-{n}",
                status_code="OK" if n % 3 else "RESOURCE_EXHAUSTED",
                details={"n": str(n)},
                **fields,
            )
            event.time.FromDatetime(datetime.now(UTC).replace(tzinfo=None))
            events.append(event)
        async with self.audit.channel("trading") as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            for start in range(0, len(events), 500):
                await stub.AppendBatch(
                    audit_pb.AppendBatchRequest(events=events[start : start + 500]), timeout=30
                )

    async def signed(self, size: int) -> None:
        """Until a checkpoint covers `size` entries."""
        async with self.audit.channel("ops") as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            while True:
                latest = await stub.GetCheckpoint(audit_pb.GetCheckpointRequest(), timeout=30)
                if latest.checkpoint.tree_size >= size:
                    return
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def audit_suite(paths: pki.PkiPaths, database: AuditDatabase, port: int = 0) -> AsyncIterator[Suite]:
    if not paths.cert("audit").is_file():
        pki.issue(paths, "audit")
    async with running_keyvault(paths, keyvault_settings(paths.home, "e2e passphrase")) as keyvault:
        async with keyvault.channel("ops") as ops:
            await ensure_key(ops, AUDIT_DEFAULT_KEY, kv_pb.KEY_TYPE_ED25519)
        settings = AuditSettings(
            server=ServerConfig(name="audit", port=port, home=paths.home, grace_s=1.0),
            database_url=database.url,
            keyvault_target=keyvault.target,
            checkpoint_interval_s=0.01,
        )
        async with running_service(database.declaration(), settings, paths) as audit:
            env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
            env |= {
                "PYTHONPATH": str(ROOT),
                "TRADEGUARD_HOME": str(paths.home),
                "TRADEGUARD_AUDIT_PORT": str(audit.port),
                "TRADEGUARD_KEYVAULT_PORT": str(keyvault.port),
            }
            yield Suite(paths, audit, database, env)


@pytest.fixture(params=["sqlite", "postgres"])
async def any_suite(
    request: pytest.FixtureRequest, pki_paths: pki.PkiPaths, tmp_path: Path
) -> AsyncIterator[Suite]:
    """The suite on SQLite and on PostgreSQL."""
    async with (
        open_database(AuditDatabase, request.param, tmp_path) as database,
        audit_suite(pki_paths, database) as running,
    ):
        yield running


@pytest.fixture
async def suite(pki_paths: pki.PkiPaths, tmp_path: Path) -> AsyncIterator[Suite]:
    async with (
        open_database(AuditDatabase, "sqlite", tmp_path) as database,
        audit_suite(pki_paths, database) as running,
    ):
        yield running


async def _verified(suite: Suite) -> str:
    done = await suite.run("audit", "verify")
    assert done.returncode == 0 and done.stderr == "", (done.stdout, done.stderr)
    return done.stdout


async def test_verify_passes_on_a_live_log_and_names_an_entry_an_attacker_altered(any_suite: Suite) -> None:
    suite, database = any_suite, any_suite.database
    await suite.append(1200)
    await suite.signed(1200)
    shown = await _verified(suite)
    assert shown.startswith("ok: 1200 entries, ") and "signed checkpoints verified" in shown

    # the database refuses a change while its triggers stand
    for refused in (
        "UPDATE {schema}.entries SET principal = 'x' WHERE sequence = 700",
        "DELETE FROM {schema}.entries",
    ):
        with pytest.raises((sqlite3.DatabaseError, psycopg.Error), match="append-only"):
            database.execute(refused)
    export = suite.paths.home / "export.json"
    done = await suite.run(
        "audit", "export", "--since", "1h", "--until", "0s", "--format", "json", "--output", str(export)
    )
    assert done.returncode == 0, done.stderr
    # the attacker drops them and rewrites entry 700's bytes AND its stored leaf hash, consistently
    original = database.entry_bytes(700)
    forged = original.replace(b"alice", b"mallo")
    assert forged != original
    database.attack(
        "UPDATE {schema}.entries SET entry_bytes = %s, leaf_hash = %s WHERE sequence = %s",
        (forged, tlog.leaf_hash(forged), 700),
    )
    done = await suite.run("audit", "verify")
    assert done.returncode == 1, (done.stdout, done.stderr)
    first = done.stdout.splitlines()[0]
    assert first.startswith("FAILED: entry 700: altered"), done.stdout
    assert tlog.leaf_hash(forged).hex() in first
    # the earlier export says what entry 700's hash was
    done = await suite.run("audit", "verify", "--against", str(export))
    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == (
        f"FAILED: entry 700: altered (its bytes hash to {tlog.leaf_hash(forged).hex()}, the earlier export "
        f"recorded {tlog.leaf_hash(original).hex()})"
    )


async def test_verify_names_bytes_altered_under_their_hash_and_a_deleted_entry(any_suite: Suite) -> None:
    suite, database = any_suite, any_suite.database
    await suite.append(300)
    await suite.signed(300)
    await _verified(suite)
    recorded = tlog.leaf_hash(database.entry_bytes(123))
    forged = database.entry_bytes(123).replace(b"bob", b"eve")
    database.attack("UPDATE {schema}.entries SET entry_bytes = %s WHERE sequence = %s", (forged, 123))
    done = await suite.run("audit", "verify")
    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == (
        f"FAILED: entry 123: altered (its bytes hash to {tlog.leaf_hash(forged).hex()}, the log recorded "
        f"{recorded.hex()})"
    )
    database.attack("DELETE FROM {schema}.entries WHERE sequence = %s", (200,))
    done = await suite.run("audit", "verify")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("FAILED: entry 123: altered") and lines[0].endswith(" (and 1 more problem)")
    assert lines[1:] == ["  entry 200: missing (the log goes from entry 199 to entry 201)"]


async def test_verify_with_key_files_and_the_wrong_key(suite: Suite, tmp_path: Path) -> None:
    await suite.append(10)
    await suite.signed(10)
    async with suite.audit.channel("ops") as channel:
        latest = await audit_pb2_grpc.AuditServiceStub(channel).GetCheckpoint(audit_pb.GetCheckpointRequest())
    keyvault_port = int(suite.env["TRADEGUARD_KEYVAULT_PORT"])
    async with MeshChannel(
        f"127.0.0.1:{keyvault_port}", "keyvault", tls.Workload.of(suite.paths, "ops")
    ) as vault:
        key = await keyvault_pb2_grpc.KeyVaultServiceStub(vault).GetKey(
            kv_pb.GetKeyRequest(name=AUDIT_DEFAULT_KEY)
        )
    raw = bytes(key.key.versions[-1].public_key)
    origin = latest.checkpoint.note.split("\n", 1)[0]
    good = tmp_path / "checkpoint.vkey"
    good.write_text(
        f"{origin}+{tlog.key_hash(origin, raw).hex()}+{base64.b64encode(bytes([1]) + raw).decode()}\n"
    )
    done = await suite.run("audit", "verify", "--public-key", str(good))
    assert done.returncode == 0 and done.stdout.startswith("ok: 10 entries"), (done.stdout, done.stderr)
    _, other = _ed25519()
    wrong = tmp_path / "wrong.key"
    wrong.write_text(base64.b64encode(other).decode() + "\n")
    done = await suite.run("audit", "verify", "--public-key", str(wrong))
    assert done.returncode == 1
    assert "its signature does not verify with the trusted keys" in done.stdout.splitlines()[0]
    # not checkable: exit status 2 with one line saying why
    denied = await suite.run("audit", "verify", "--as", "trading", "--public-key", str(good))
    assert denied.returncode == 2 and denied.stdout == "" and denied.stderr.startswith("PERMISSION_DENIED")
    suite.env["TRADEGUARD_AUDIT_PORT"] = str(free_port())
    down = await suite.run("audit", "verify")
    assert down.returncode == 2 and down.stderr.startswith("UNAVAILABLE") and "tradeguard up" in down.stderr


async def test_query_and_export(suite: Suite, tmp_path: Path) -> None:
    await suite.append(30)
    done = await suite.run("audit", "query", "--principal", "bob", "--outcome", "ok", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows and all(r["principal"] == "bob" and r["outcome"] == "OK" for r in rows)
    assert [r["sequence"] for r in rows] == [n for n in range(30) if n % 2 == 1 and n % 3]
    text = await suite.run("audit", "query", "--limit", "5", "--since", "1h")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 5 and text.stderr == "5 entries\n"
    assert "PlaceOrder" in text.stdout.splitlines()[0]
    refused = await suite.run("audit", "--as", "trading", "query")
    assert refused.returncode == 1 and refused.stderr.startswith("PERMISSION_DENIED")

    out = tmp_path / "export.csv"
    done = await suite.run("audit", "export", "--since", "1h", "--until", "0s", "--output", str(out))
    assert done.returncode == 0 and done.stderr == "exported 30 entries\n", done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    table = list(csv.DictReader(io.StringIO(out.read_bytes().decode(), newline="")))
    assert [int(r["sequence"]) for r in table] == list(range(30))
    assert table[4]["details"] == '{"n":"4"}' and table[3]["outcome"] == "DENIED_QUOTA"
    ocsf = await suite.run("audit", "export", "--since", "1h", "--until", "0s", "--format", "ocsf")
    events = [json.loads(line) for line in ocsf.stdout.splitlines()]
    assert len(events) == 30 and {e["class_uid"] for e in events} == {6003}


async def test_export_reaches_a_real_syslog_receiver_over_tcp_and_tls(suite: Suite) -> None:
    await suite.append(25)
    async with SyslogReceiver().running() as receiver:
        done = await suite.run(
            "audit", "export", "--since", "1h", "--until", "0s", "--format", "cef",
            "--syslog", f"127.0.0.1:{receiver.port}",
        )  # fmt: skip
        assert done.returncode == 0 and done.stderr == "exported 25 entries\n", done.stderr
        await _until(lambda: len(receiver.messages) == 25)
    parsed = [parse_syslog(m) for m in receiver.messages]
    assert [p["sd"]["tradeguard@32473"]["sequence"] for p in parsed] == [str(n) for n in range(25)]
    assert split_cef(parsed[2]["msg"])[1]["suser"] == "alice" and receiver.errors == []

    async with SyslogReceiver(receiver_tls(suite.paths)).running() as secure:
        done = await suite.run(
            "audit", "export", "--since", "1h", "--until", "0s", "--format", "ocsf",
            "--syslog", f"127.0.0.1:{secure.port}", "--tls", "--tls-name", "syslog",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        await _until(lambda: len(secure.messages) == 25)
        refused = await suite.run(
            "audit", "export", "--since", "1h", "--until", "0s", "--format", "cef",
            "--syslog", f"127.0.0.1:{secure.port}", "--tls",
        )  # fmt: skip
        assert refused.returncode == 2 and "certificate verify failed" in refused.stderr
    assert secure.tls_versions[0] == "TLSv1.3"
    assert json.loads(parse_syslog(secure.messages[0])["msg"])["metadata"]["uid"] == "e2e-0"


async def test_tail_resumes_after_a_restart_without_gap_or_duplicate(
    pki_paths: pki.PkiPaths, tmp_path: Path
) -> None:
    port = free_port()
    async with open_database(AuditDatabase, "sqlite", tmp_path) as database:
        async with audit_suite(pki_paths, database, port=port) as first:
            await first.append(5)
            tail = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tradeguard.cli.main", "audit", "tail", "--from", "2", "--count", "13",
                "--format", "json",
                env=first.env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert tail.stdout is not None
            seen = [
                json.loads(await asyncio.wait_for(tail.stdout.readline(), 60))["sequence"] for _ in range(3)
            ]
            appended = first.appended
        async with audit_suite(
            pki_paths, database, port=port
        ) as second:  # the same log, the service restarted
            second.appended = appended
            await second.append(10)
            out, err = await asyncio.wait_for(tail.communicate(), 120)
    assert tail.returncode == 0, err
    seen += [json.loads(line)["sequence"] for line in out.decode().splitlines()]
    assert seen == list(range(2, 15))
    assert "reconnecting from sequence 5" in err.decode()


# --- a log pruned by retention ------------------------------------------------------------------------------------


async def test_verify_a_pruned_log_with_its_archive(pki_paths: pki.PkiPaths, tmp_path: Path) -> None:
    """Entries recorded three years ago (the core's injected clock), signed, archived and pruned with a one-year
    retention; then the real service runs on that database and `audit verify` checks the log."""
    archive_dir = tmp_path / "archive"
    signer = LocalSigner()
    key_file = tmp_path / "checkpoint.pub"
    key_file.write_text(base64.b64encode(signer.public).decode() + "\n")
    async with open_database(AuditDatabase, "sqlite", tmp_path) as database:
        store = await SqliteAuditStore.open(database.path)
        clock = FakeClock(int(datetime.now(UTC).timestamp() * 1_000_000) - 3 * 365 * 86_400_000_000)
        log = AuditLog(store, codec.encode_entry, codec.event_digest, clock)
        await log.open()
        publisher = CheckpointPublisher(log, store, signer, audit_cmd.DEFAULT_ORIGIN, 1.0, clock)
        for batch in range(3):
            events = [
                Event(event_id=f"old-{batch}-{n}", time_us=clock() - 1, outcome=Outcome.OK, principal="alice")
                for n in range(10)
            ]
            await log.append(events, "spiffe://tradeguard.test/ns/default/sa/trading")
            await publisher.publish()
            clock.advance(1_000_000)
        recent = FakeClock(int(datetime.now(UTC).timestamp() * 1_000_000))
        log2 = AuditLog(store, codec.encode_entry, codec.event_digest, recent)
        await log2.open()
        await log2.append(
            [Event(event_id="new-0", time_us=recent() - 1, outcome=Outcome.OK)], "spiffe://tradeguard.test/x"
        )
        publisher2 = CheckpointPublisher(log2, store, signer, audit_cmd.DEFAULT_ORIGIN, 1.0, recent)
        await publisher2.publish()
        assert await Retention(store, archive_dir, 365, 3600.0, recent, segment_limit=12).run_once() == 30
        await log.close()
        await log2.close()
        await store.close()

        async with audit_suite(pki_paths, database) as suite:
            verify = ("audit", "verify", "--public-key", str(key_file))
            done = await suite.run(*verify, "--archive-dir", str(archive_dir))
            assert done.returncode == 0, (done.stdout, done.stderr)
            assert done.stdout.startswith("ok: 31 entries (30 of them from the archive), ")
            # without the archive: a failure, and the hint
            done = await suite.run(*verify)
            assert done.returncode == 1
            assert done.stdout.splitlines()[0] == "FAILED: entry 0: missing (the log starts at entry 30)"
            assert "entries 0 to 29 are not in the log: if retention archived and removed them" in done.stdout
            # an altered archive line is named
            second = archive_dir / archive.segment_name(12, 23)
            lines = second.read_text().splitlines()
            row = json.loads(lines[2])  # entry 13
            row["entry_bytes"] = base64.b64encode(base64.b64decode(row["entry_bytes"]) + b"!").decode()
            lines[2] = json.dumps(row)
            second.write_text("\n".join(lines) + "\n")
            done = await suite.run(*verify, "--archive-dir", str(archive_dir))
            assert done.returncode == 1
            assert done.stdout.startswith(f"FAILED: {second.name}: entry 13: altered (its bytes hash to ")
