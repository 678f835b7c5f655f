"""The checkpoint publisher with the real key vault: checkpoints published while events arrive, each a C2SP signed
note that verifies (tradeguard.audit.tlog, not the service) under the vault's public key and consistent with the one
before; a key rotation; a signing failure logged and retried without stopping the service, checkpoints resuming
once the key exists; nothing signed twice for one size; a last checkpoint at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.audit import codec
from services.audit.checkpoints import CheckpointPublisher
from services.audit.core import AuditLog
from services.audit.model import Event, Outcome
from services.audit.store_sqlite import SqliteAuditStore
from tests.services.audit.test_service import (
    CALL_S,
    KEY,
    ORIGIN,
    Audit,
    event,
    latest_checkpoint,
    open_checkpoint,
    running_audit,
    stub,
)
from tradeguard.audit import tlog
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.keyvault.signer import VaultSigner, ensure_key
from tradeguard.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.storage import clock_us
from tradeguard.testing import LogCapture, eventually


async def checkpoints(audit: Audit) -> list[pb.SignedCheckpoint]:
    async with audit.channel("ops") as channel:
        reply = await stub(channel).ListCheckpoints(pb.ListCheckpointsRequest(page_size=1000), timeout=CALL_S)
    return list(reply.checkpoints)


async def check_chain(audit: Audit, found: list[pb.SignedCheckpoint], keys: list[bytes]) -> None:
    """Each checkpoint verifies as a signed note under `keys`, sizes grow, and each is consistent with the one
    before (the service's proof, checked by tlog)."""
    assert [c.tree_size for c in found] == sorted({c.tree_size for c in found})  # no size signed twice
    async with audit.channel("ops") as channel:
        client = stub(channel)
        for checkpoint in found:
            assert open_checkpoint(checkpoint.note, keys) == (
                ORIGIN,
                checkpoint.tree_size,
                checkpoint.root_hash,
            )
            with pytest.raises(tlog.NoteError):  # the note's key name is the origin
                tlog.open_note(checkpoint.note, "another.origin/audit", keys)
        for first, second in itertools.pairwise(found):
            proof = await client.GetConsistencyProof(
                pb.GetConsistencyProofRequest(first_size=first.tree_size, second_size=second.tree_size),
                timeout=CALL_S,
            )
            assert tlog.verify_consistency(
                first.tree_size, second.tree_size, list(proof.hashes), first.root_hash, second.root_hash
            )


async def test_checkpoints_are_published_while_events_arrive(pki_paths: pki.PkiPaths) -> None:
    async with running_audit(pki_paths) as audit:
        written = 0
        stop = asyncio.Event()

        async def write() -> None:
            nonlocal written
            async with audit.channel("trading") as channel:
                client = stub(channel)
                while not stop.is_set():
                    await client.AppendBatch(
                        pb.AppendBatchRequest(events=[event(f"w-{written}-{i}") for i in range(5)]),
                        timeout=CALL_S,
                    )
                    written += 5

        writer = asyncio.create_task(write())
        try:
            found: list[pb.SignedCheckpoint] = []
            while len(found) < 4:  # several checkpoints while the writer is still appending
                assert not writer.done()
                found = await checkpoints(audit)
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await writer
        last = await latest_checkpoint(audit, written)  # and the last one covers everything appended
        assert last.tree_size == written
        found = await checkpoints(audit)
        assert found[-1].tree_size == written and len(found) >= 4
        await check_chain(audit, found, await audit.public_keys())


async def test_a_rotated_key_signs_the_next_checkpoints(pki_paths: pki.PkiPaths) -> None:
    async with running_audit(pki_paths) as audit:
        async with audit.channel("trading") as channel:
            await stub(channel).Append(pb.AppendRequest(event=event("before")), timeout=CALL_S)
            before = await latest_checkpoint(audit, 1)
            old_keys = await audit.public_keys()
            async with audit.keyvault.channel("ops") as ops:
                await keyvault_pb2_grpc.KeyVaultServiceStub(ops).RotateKey(
                    keyvault_pb2.RotateKeyRequest(name=KEY), timeout=CALL_S
                )
            await stub(channel).Append(pb.AppendRequest(event=event("after")), timeout=CALL_S)
            after = await latest_checkpoint(audit, 2)
        keys = await audit.public_keys()
        assert len(old_keys) == 1 and len(keys) == 2
        open_checkpoint(before.note, old_keys)
        with pytest.raises(tlog.NoteError):
            open_checkpoint(after.note, old_keys)  # signed by version 2
        open_checkpoint(after.note, [k for k in keys if k not in old_keys])
        await check_chain(audit, await checkpoints(audit), keys)


async def test_a_signing_failure_is_logged_and_retried_and_never_stops_the_service(
    pki_paths: pki.PkiPaths,
) -> None:
    capture = LogCapture(level="info")
    async with running_audit(pki_paths, create_key=False) as audit:  # the checkpoint key does not exist yet
        async with audit.channel("trading") as channel:
            appended = await stub(channel).Append(pb.AppendRequest(event=event("unsigned")), timeout=CALL_S)
            assert appended.appended.sequence == 0  # appends never wait for a signature

            def failures() -> list[dict[str, object]]:
                return [line for line in capture.lines() if line.get("event") == "audit.checkpoint_failed"]

            await eventually(lambda: len(failures()) >= 3, within_s=CALL_S)  # retried, again and again
            assert {line["cause"] for line in failures()} == {"key vault sign: NOT_FOUND KEY_NOT_FOUND"}
            async with audit.channel("ops") as ops:
                empty = await stub(ops).GetCheckpoint(pb.GetCheckpointRequest(), timeout=CALL_S)
                assert not empty.HasField("checkpoint")
            more = await stub(channel).Append(pb.AppendRequest(event=event("still")), timeout=CALL_S)
            assert more.appended.sequence == 1  # the service goes on
            async with audit.keyvault.channel("ops") as ops:  # the operator creates the key: signing resumes
                await ensure_key(ops, KEY, keyvault_pb2.KEY_TYPE_ED25519)
            checkpoint = await latest_checkpoint(audit, 2)
        assert open_checkpoint(checkpoint.note, await audit.public_keys())[1] == 2


@contextlib.asynccontextmanager
async def publisher_on(audit: Audit, path: Path) -> AsyncIterator[tuple[AuditLog, CheckpointPublisher]]:
    """A log on its own SQLite file and a publisher signing with the audit service's vault (no service)."""
    store = await SqliteAuditStore.open(path)
    log = AuditLog(store, codec.encode_entry, codec.event_digest, clock_us)
    try:
        await log.open()
        async with audit.keyvault.channel("audit") as channel:
            signer = VaultSigner(channel, KEY)
            yield log, CheckpointPublisher(log, store, signer, ORIGIN, 0.05, clock_us)
    finally:
        await log.close()
        await store.close()


def _event(event_id: str) -> Event:
    return Event(event_id=event_id, time_us=clock_us(), outcome=Outcome.OK, method="/x.Y/Z")


async def test_nothing_is_signed_twice_and_close_signs_the_rest(
    pki_paths: pki.PkiPaths, tmp_path: Path
) -> None:
    async with (
        running_audit(pki_paths) as audit,
        publisher_on(audit, tmp_path / "own.db") as (log, publisher),
    ):
        assert await publisher.publish() is None  # an empty log: nothing to sign
        await log.append([_event("a"), _event("b")], "spiffe://tradeguard.test/svc/trading")
        first = await publisher.publish()
        assert first is not None and first.tree_size == 2 and first.root_hash == log.root
        assert await publisher.publish() is None  # the same size is never signed twice
        await log.append([_event("c")], "spiffe://tradeguard.test/svc/trading")
        await publisher.close()  # at shutdown: the rest is signed
        keys = await audit.public_keys()
        assert publisher.latest is not None and publisher.latest.tree_size == 3
        assert tlog.parse_checkpoint(tlog.open_note(publisher.latest.note, ORIGIN, keys)) == (
            ORIGIN,
            3,
            log.root,
        )
        assert tlog.parse_checkpoint(tlog.open_note(first.note, ORIGIN, keys))[1] == 2
