"""Crash safety of the audit service as a process: `python -m services.audit` (the real key vault beside it, SQLite,
and PostgreSQL in a fresh schema when reachable) killed with SIGKILL in the middle of a stream of concurrent
appends (unary Append and AppendBatch from several tasks), then started again on the same database.

What must hold after the restart:
- every acknowledged event is stored at the sequence it was acknowledged with, under the leaf hash it was
  acknowledged with, and the entry's bytes hash to it;
- the sequences have no gap;
- an event sent but not acknowledged may or may not be there; sending it again (same event id) answers the
  stored entry when it is there (`created` false, its sequence and leaf hash) and appends it once otherwise, so
  no event id is ever stored twice; an acknowledged event sent again answers its acknowledged place;
- the whole log, the checkpoints signed before the kill included, verifies with the independent verifier
  (tradeguard.audit.verify over GetEntries and ListCheckpoints, the key vault's public keys, the service's proofs).

The kill comes once KILL_AFTER acknowledgements (unary and batch alike) have arrived: the test waits for that
state, never for a guessed delay. Timeouts are generous: the machine may be loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from psycopg import sql

from services.audit.store_postgres import pruner_role, writer_role
from tests.services.audit.test_service import KEY, ORIGIN, event, stub
from tests.support import PG_DSN, drop_pg_schema, free_port, require_pg, wait_healthy
from tests.support_auth import keyvault_settings, running_keyvault
from tradeguard.audit import tlog
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.verify import verify_log
from tradeguard.keyvault.signer import ensure_key
from tradeguard.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.testing import eventually

ROOT = Path(__file__).resolve().parents[3]
CALL_S = 60.0  # only there so that a hang fails the test instead of stalling it
KILL_AFTER = 400  # acknowledged events before the kill
UNARY_WRITERS = 4
BATCH_WRITERS = 2
PAGE = 1000

# `python -m services.audit` with its PostgreSQL store in the test's own schema (the service has no schema
# setting: its store's default is tg_audit, shared by whatever else runs on this server).
IN_SCHEMA = """\
import sys
from dataclasses import replace

from services.audit.service import SERVICE
from services.audit.store_postgres import PostgresAuditStore
from services.audit.store_sqlite import SqliteAuditStore
from tradeguard.service import Stores, main

schema = sys.argv.pop(1)
stores = Stores(sqlite=SqliteAuditStore.open, postgres=lambda dsn: PostgresAuditStore.open(dsn, schema=schema))
raise SystemExit(main(replace(SERVICE, stores=stores)))
"""


@dataclass
class Backend:
    """Where the audit process keeps its log, and how it is started on it."""

    database_url: str
    schema: str | None = None  # PostgreSQL: the test's own schema

    def command(self) -> list[str]:
        if self.schema is None:
            return [sys.executable, "-m", "services.audit"]
        return [sys.executable, "-c", IN_SCHEMA, self.schema]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend(f"sqlite:///{tmp_path / 'crash' / 'audit.db'}")
        return
    require_pg()
    schema = f"tg_audit_crash_{secrets.token_hex(4)}"
    try:
        yield Backend(PG_DSN, schema)
    finally:
        drop_pg_schema(schema)
        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            for role in (writer_role(schema), pruner_role(schema)):
                pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@dataclass
class AuditProcess:
    process: subprocess.Popen[bytes]
    target: str
    log: Path


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would block the service
        return subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=ROOT)


@contextlib.asynccontextmanager
async def audit_process(
    paths: pki.PkiPaths, backend: Backend, vault_target: str, run: int
) -> AsyncIterator[AuditProcess]:
    """The audit service as a process on `backend`, until it reports SERVING; killed on exit if still running."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
    env.update(
        TRADEGUARD_HOME=str(paths.home),
        TRADEGUARD_AUDIT_PORT=str(port),
        TRADEGUARD_AUDIT_DATABASE_URL=backend.database_url,
        TRADEGUARD_AUDIT_KEYVAULT_TARGET=vault_target,
        TRADEGUARD_AUDIT_ORIGIN=ORIGIN,
        TRADEGUARD_AUDIT_CHECKPOINT_INTERVAL_S="0.05",
        TRADEGUARD_AUDIT_GRACE_S="0",
        PYTHONUNBUFFERED="1",
    )
    log = paths.home / f"audit-{run}.log"
    process = spawn(backend.command(), env, log)
    target = f"127.0.0.1:{port}"
    try:
        await wait_healthy(process, target, "audit", tls.Workload.of(paths, "ops"), log)
        yield AuditProcess(process, target, log)
    finally:
        if process.poll() is None:
            process.kill()
        await asyncio.to_thread(process.wait, CALL_S)


@dataclass
class Ledger:
    """What the writers sent and what the service acknowledged (event id → (sequence, leaf hash))."""

    sent: dict[str, pb.Event] = field(default_factory=dict)
    acknowledged: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    by_unary: int = 0
    by_batch: int = 0
    killed: bool = False
    early_errors: list[str] = field(default_factory=list)  # failures before the kill: none expected


async def unary_writer(channel: grpc.aio.Channel, ledger: Ledger, w: int) -> None:
    audit = stub(channel)
    n = 0
    while True:
        message = event(f"crash-u{w}-{n}", resource=f"ord-u{w}-{n}")
        ledger.sent[message.event_id] = message
        n += 1
        try:
            reply = await audit.Append(pb.AppendRequest(event=message), timeout=CALL_S)
        except grpc.aio.AioRpcError as error:
            if not ledger.killed:
                ledger.early_errors.append(f"Append: {error.code().name} {error.details()}")
            return
        assert reply.appended.created
        ledger.acknowledged[message.event_id] = (reply.appended.sequence, bytes(reply.appended.leaf_hash))
        ledger.by_unary += 1


async def batch_writer(channel: grpc.aio.Channel, ledger: Ledger, w: int) -> None:
    audit = stub(channel)
    n = 0
    while True:
        batch = [event(f"crash-b{w}-{n + i}", resource=f"ord-b{w}-{n + i}") for i in range(1 + n % 25)]
        n += len(batch)
        for message in batch:
            ledger.sent[message.event_id] = message
        try:
            reply = await audit.AppendBatch(pb.AppendBatchRequest(events=batch), timeout=CALL_S)
        except grpc.aio.AioRpcError as error:
            if not ledger.killed:
                ledger.early_errors.append(f"AppendBatch: {error.code().name} {error.details()}")
            return
        assert len(reply.appended) == len(batch)
        for message, appended in zip(batch, reply.appended, strict=True):
            assert appended.created
            ledger.acknowledged[message.event_id] = (appended.sequence, bytes(appended.leaf_hash))
        ledger.by_batch += len(batch)


async def all_entries(channel: grpc.aio.Channel) -> list[pb.StoredEntry]:
    audit, found, start = stub(channel), list[pb.StoredEntry](), 0
    while True:
        reply = await audit.GetEntries(pb.GetEntriesRequest(start=start, count=PAGE), timeout=CALL_S)
        if not reply.entries:
            return found
        found += reply.entries
        start = reply.entries[-1].sequence + 1


async def all_checkpoints(channel: grpc.aio.Channel) -> list[pb.SignedCheckpoint]:
    audit, found, after = stub(channel), list[pb.SignedCheckpoint](), 0
    while True:
        reply = await audit.ListCheckpoints(
            pb.ListCheckpointsRequest(after_size=after, page_size=PAGE), timeout=CALL_S
        )
        if not reply.checkpoints:
            return found
        found += reply.checkpoints
        after = reply.checkpoints[-1].tree_size


class ServiceProofs:
    """The service's proofs over gRPC, for the verifier (which checks each against a signed root)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = stub(channel)

    async def inclusion(self, index: int, size: int) -> tuple[bytes, Sequence[bytes]]:
        reply = await self._stub.GetInclusionProof(
            pb.GetInclusionProofRequest(sequence=index, tree_size=size), timeout=CALL_S
        )
        return bytes(reply.leaf_hash), [bytes(h) for h in reply.hashes]

    async def consistency(self, size1: int, size2: int) -> Sequence[bytes]:
        reply = await self._stub.GetConsistencyProof(
            pb.GetConsistencyProofRequest(first_size=size1, second_size=size2), timeout=CALL_S
        )
        return [bytes(h) for h in reply.hashes]


async def signed_covering(channel: grpc.aio.Channel, size: int) -> None:
    """Until the latest checkpoint covers `size` entries (the publisher signs within 50 ms of growth)."""
    audit = stub(channel)
    async with asyncio.timeout(CALL_S):
        while True:
            reply = await audit.GetCheckpoint(pb.GetCheckpointRequest(), timeout=CALL_S)
            if reply.HasField("checkpoint") and reply.checkpoint.tree_size >= size:
                return
            await asyncio.sleep(0.01)


async def test_kill_9_during_concurrent_appends_loses_no_acknowledged_event(
    pki_paths: pki.PkiPaths, backend: Backend
) -> None:
    pki.issue(pki_paths, "audit")
    vault_settings = keyvault_settings(pki_paths.home, "audit crash test passphrase", name="crash-keyvault")
    trading = tls.Workload.of(pki_paths, "trading")
    ops = tls.Workload.of(pki_paths, "ops")
    ledger = Ledger()
    async with running_keyvault(pki_paths, vault_settings) as keyvault:
        async with keyvault.channel("ops") as vault:
            await ensure_key(vault, KEY, keyvault_pb2.KEY_TYPE_ED25519)
            key = (
                await keyvault_pb2_grpc.KeyVaultServiceStub(vault).GetKey(
                    keyvault_pb2.GetKeyRequest(name=KEY), timeout=CALL_S
                )
            ).key
        public_keys = [bytes(v.public_key) for v in key.versions]

        # --- the stream of appends, and the kill in the middle of it -------------------------------------------
        async with audit_process(pki_paths, backend, keyvault.target, 1) as first:
            async with MeshChannel(first.target, "audit", trading) as channel:
                writers = [
                    *(asyncio.ensure_future(unary_writer(channel, ledger, w)) for w in range(UNARY_WRITERS)),
                    *(asyncio.ensure_future(batch_writer(channel, ledger, w)) for w in range(BATCH_WRITERS)),
                ]
                try:
                    await eventually(
                        lambda: (
                            bool(ledger.early_errors)
                            or (
                                len(ledger.acknowledged) >= KILL_AFTER
                                and ledger.by_unary > 0
                                and ledger.by_batch > 0
                            )
                        ),
                        within_s=300,
                    )
                    assert not ledger.early_errors, ledger.early_errors
                    ledger.killed = True
                    os.kill(first.process.pid, signal.SIGKILL)
                    async with asyncio.timeout(CALL_S * 2):
                        await asyncio.gather(*writers)  # each ends at its first failed call
                finally:
                    for writer in writers:
                        writer.cancel()
            assert await asyncio.to_thread(first.process.wait, CALL_S) == -signal.SIGKILL
        acknowledged = dict(ledger.acknowledged)
        unacknowledged = [m for event_id, m in ledger.sent.items() if event_id not in acknowledged]
        assert unacknowledged, "every writer had a call in flight when the service was killed"

        # --- the restart on the same database --------------------------------------------------------------------
        async with (
            audit_process(pki_paths, backend, keyvault.target, 2) as second,
            MeshChannel(second.target, "audit", ops) as reader,
            MeshChannel(second.target, "audit", trading) as recorder,
        ):
            stored = await all_entries(reader)
            size = len(stored)
            assert [e.sequence for e in stored] == list(range(size))  # no gap
            assert size >= len(acknowledged)
            for entry in stored:
                assert tlog.leaf_hash(entry.entry_bytes) == entry.leaf_hash
            ids = [e.entry.event.event_id for e in stored]
            assert len(set(ids)) == size  # no event twice
            for event_id, (sequence, leaf) in acknowledged.items():
                assert sequence < size, f"acknowledged {event_id} at {sequence}, the log holds {size}"
                assert stored[sequence].entry.event.event_id == event_id
                assert stored[sequence].leaf_hash == leaf, event_id
            present = {event_id: e for event_id, e in zip(ids, stored, strict=True)}
            assert set(present) <= set(ledger.sent)

            # an unacknowledged event sent again: its stored place when it got there, else appended once
            audit = stub(recorder)
            grown = size
            for start in range(0, len(unacknowledged), PAGE):
                chunk = unacknowledged[start : start + PAGE]
                reply = await audit.AppendBatch(pb.AppendBatchRequest(events=chunk), timeout=CALL_S)
                for message, appended in zip(chunk, reply.appended, strict=True):
                    there = present.get(message.event_id)
                    if there is None:
                        assert appended.created and appended.sequence >= size
                        grown += 1
                    else:
                        assert not appended.created
                        assert (appended.sequence, appended.leaf_hash) == (there.sequence, there.leaf_hash)
            # an acknowledged event sent again answers where it was acknowledged
            for event_id in list(acknowledged)[:: max(1, len(acknowledged) // 25)]:
                again = await audit.Append(pb.AppendRequest(event=ledger.sent[event_id]), timeout=CALL_S)
                assert not again.appended.created
                assert (again.appended.sequence, bytes(again.appended.leaf_hash)) == acknowledged[event_id]
            fresh = await audit.Append(pb.AppendRequest(event=event("after-restart")), timeout=CALL_S)
            assert fresh.appended.created and fresh.appended.sequence == grown
            final = grown + 1

            after = await all_entries(reader)
            assert [e.sequence for e in after] == list(range(final))
            assert sorted(e.entry.event.event_id for e in after) == sorted([*ledger.sent, "after-restart"])
            assert after[:size] == stored

            # --- the independent verifier over the whole log -----------------------------------------------------
            await signed_covering(reader, final)
            checkpoints = await all_checkpoints(reader)

            async def entries() -> AsyncIterator[pb.StoredEntry]:
                for entry in await all_entries(reader):
                    yield entry

            report = await verify_log(
                entries(), checkpoints, public_keys, origin=ORIGIN, proofs=ServiceProofs(reader)
            )
            assert report.ok, report.problems
            assert report.entries == final and checkpoints[-1].tree_size == final
            assert report.checkpoints >= 1
