"""Retention (services/audit/retention.py) on real SQLite and PostgreSQL (conftest's `audit_db`): entries made old
through the core's injected clock are archived to segment files (atomically, owner-only, their SHA-256 in the
`archives` table) and only then pruned; entries that are recent, or that no signed checkpoint covers yet, stay; a
clock far ahead cannot make the database drop recent entries; a shorter configured period is logged and the
longer one kept; after pruning the remaining entries still have valid inclusion and consistency proofs, Tail from
the pruned range answers FAILED_PRECONDITION (ARCHIVED), and the log verifies (tradeguard.audit.verify) from its
archive merged with the stored entries, while an altered or missing archive segment is named."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.audit import codec
from services.audit.checkpoints import CheckpointPublisher
from services.audit.core import AuditLog
from services.audit.model import Checkpoint, Event, Outcome, StoredEntry
from services.audit.retention import Retention
from services.audit.servicer import AuditServicer
from services.audit.store import US_PER_DAY, AuditStore
from tradeguard.audit import archive, tlog
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.verify import Report, archived_entries, verify_log, with_archive
from tradeguard.errors import FailedPrecondition
from tradeguard.testing import FakeClock, LogCapture, eventually

from .conftest import AuditDatabase

ORIGIN = "tradeguard.test/audit"
RECORDER = "spiffe://tradeguard.test/ns/default/sa/trading"
DAYS = 365


class LocalSigner:
    """An Ed25519 key in the test (the service's is the key vault's)."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    async def sign(self, message: bytes) -> tuple[int, bytes]:
        return 1, self._key.sign(message)

    async def public_keys(self) -> list[tuple[int, bytes]]:
        return [(1, self.public)]


def now_us() -> int:
    return time.time_ns() // 1000


class Fixture:
    def __init__(self, store: AuditStore, clock: FakeClock, archive_dir: Path) -> None:
        self.store = store
        self.clock = clock
        self.archive_dir = archive_dir
        self.log = AuditLog(store, codec.encode_entry, codec.event_digest, clock)
        self.signer = LocalSigner()
        self.publisher = CheckpointPublisher(self.log, store, self.signer, ORIGIN, 1.0, clock)
        self.events = 0

    async def append(self, count: int) -> None:
        events = []
        for _ in range(count):
            self.events += 1
            events.append(
                Event(
                    event_id=f"ev-{self.events}",
                    time_us=self.clock() - 1000,
                    outcome=Outcome.OK,
                    method="/t.v1.Trading/Place",
                    principal="alice",
                )
            )
        await self.log.append(events, RECORDER)

    async def checkpoint(self) -> Checkpoint:
        found = await self.publisher.publish()
        assert found is not None
        return found

    def retention(self, days: int = DAYS, *, clock: FakeClock | None = None, limit: int = 10) -> Retention:
        return Retention(self.store, self.archive_dir, days, 3600.0, clock or self.clock, segment_limit=limit)


@pytest.fixture
async def fx(audit_db: AuditDatabase, tmp_path: Path) -> AsyncIterator[Fixture]:
    clock = FakeClock(now_us() - 1000 * US_PER_DAY)  # about three years ago
    fixture = Fixture(await audit_db.open(), clock, tmp_path / "archive" / "audit")
    await fixture.log.open()
    yield fixture
    await fixture.log.close()


async def stored(store: AuditStore) -> list[StoredEntry]:
    return await store.entries(0, 100_000)


async def all_entries(fx: Fixture) -> AsyncIterator[StoredEntry]:
    for entry in await stored(fx.store):
        yield entry


class LogProofs:
    def __init__(self, log: AuditLog, store: AuditStore) -> None:
        self._log, self._store = log, store

    async def inclusion(self, index: int, size: int) -> tuple[bytes, Sequence[bytes]]:
        (leaf,) = await self._store.nodes([(0, index)])
        return leaf, await self._log.inclusion_proof(index, size)

    async def consistency(self, size1: int, size2: int) -> Sequence[bytes]:
        return await self._log.consistency_proof(size1, size2)


async def verify(fx: Fixture, archive_dir: Path | None) -> Report:
    report = Report()
    entries = all_entries(fx)
    if archive_dir is not None:
        entries = with_archive(archived_entries(archive_dir, report), entries, report)  # type: ignore[assignment]
    checkpoints = await fx.store.checkpoints(0, 1000)
    return await verify_log(
        entries,
        checkpoints,
        [fx.signer.public],
        origin=ORIGIN,
        proofs=LogProofs(fx.log, fx.store),
        report=report,
    )


async def _old_then_recent(fx: Fixture, old: int = 25, recent: int = 5) -> Checkpoint:
    """`old` entries recorded ~three years ago, then `recent` recorded now (the clock moved to the real now)."""
    await fx.append(old)
    await fx.checkpoint()
    fx.clock.advance(now_us() - fx.clock())
    await fx.append(recent)
    return await fx.checkpoint()


# --- archive, then prune ------------------------------------------------------------------------------------------
async def test_old_entries_are_archived_then_pruned(fx: Fixture) -> None:
    latest = await _old_then_recent(fx)
    before = await stored(fx.store)
    assert len(before) == 30
    retention = fx.retention()
    assert await retention.run_once() == 25
    assert retention.effective_days == DAYS
    assert [e.sequence for e in await stored(fx.store)] == list(range(25, 30))
    assert await fx.store.size() == 30 and fx.log.size == 30
    archives = await fx.store.archives()
    assert [(a.first_sequence, a.last_sequence) for a in archives] == [(0, 9), (10, 19), (20, 24)]
    assert stat.S_IMODE(fx.archive_dir.stat().st_mode) == 0o700
    by_sequence = {e.sequence: e for e in before}
    for row in archives:
        path = fx.archive_dir / row.file_name
        assert row.file_name == archive.segment_name(row.first_sequence, row.last_sequence)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        data = path.read_bytes()
        assert hashlib.sha256(data).digest() == row.sha256
        segment = archive.read_segment(data, row.file_name)
        assert archive.check_segment(segment, row.file_name) == []
        assert segment.checkpoint_note == latest.note and segment.checkpoint_size == 30
        for entry in segment.entries:  # the exact stored bytes and leaf hashes
            original = by_sequence[entry.sequence]
            assert (entry.entry_bytes, entry.leaf_hash) == (original.entry_bytes, original.leaf_hash)
    assert [p.name for p in fx.archive_dir.iterdir() if p.name.startswith(".")] == []  # no temporary left
    # nothing more is old enough: a second pass archives nothing
    assert await retention.run_once() == 0
    assert len(await fx.store.archives()) == 3


async def test_the_pruned_log_still_proves_and_verifies(fx: Fixture) -> None:
    await _old_then_recent(fx)
    leaves = [e.leaf_hash for e in await stored(fx.store)]
    await fx.retention().run_once()
    latest = await fx.store.latest_checkpoint()
    assert latest is not None
    root = tlog.root(leaves)
    for index in (3, 25, 29):  # a pruned entry's proof too: the nodes are kept
        proof = await fx.log.inclusion_proof(index, 30)
        assert tlog.verify_inclusion(leaves[index], index, 30, proof, root)
    proof = await fx.log.consistency_proof(25, 30)
    assert tlog.verify_consistency(25, 30, proof, tlog.root(leaves[:25]), root)
    # the log appends on from where it was, and is checkpointed again
    await fx.append(3)
    await fx.checkpoint()
    assert fx.log.size == 33
    report = await verify(fx, fx.archive_dir)
    assert report.ok, report.problems
    assert (report.entries, report.archived) == (33, 25)
    assert report.summary().startswith("ok: 33 entries (25 of them from the archive)")
    # without the archive: never a silent success
    without = await verify(fx, None)
    assert not without.ok
    assert without.problems[0] == "entry 0: missing (the log starts at entry 25)"


def _rewrite_line(path: Path, line: int, change: dict[str, object]) -> None:
    lines = path.read_text().splitlines()
    row = json.loads(lines[line])
    row.update(change)
    lines[line] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


async def test_an_altered_or_missing_archive_is_named(fx: Fixture) -> None:
    await _old_then_recent(fx)
    await fx.retention().run_once()
    second = fx.archive_dir / archive.segment_name(10, 19)
    original = second.read_bytes()
    # an entry's bytes altered (its leaf hash left): named by the file and the entry
    forged = base64.b64encode(b"forged entry").decode()
    _rewrite_line(second, 3, {"entry_bytes": forged})  # line 3: entry 12
    report = await verify(fx, fx.archive_dir)
    assert not report.ok
    assert report.problems[0].startswith(f"{second.name}: entry 12: altered (its bytes hash to ")
    # bytes and leaf hash altered together: the segment no longer leads to the next, the roots differ
    second.write_bytes(original)
    _rewrite_line(second, 3, {"entry_bytes": forged, "leaf_hash": tlog.leaf_hash(b"forged entry").hex()})
    report = await verify(fx, fx.archive_dir)
    assert not report.ok
    assert f"{second.name}: its entries do not lead from range_before to range_after" in report.problems
    assert any(p.startswith("entry 12: altered") for p in report.problems), report.problems
    # a missing segment: the range no file holds is named
    second.unlink()
    report = await verify(fx, fx.archive_dir)
    assert not report.ok
    assert "entries 10 to 19: in no archive segment (a segment file before " in report.problems[0]
    # the last segment missing
    second.write_bytes(original)
    (fx.archive_dir / archive.segment_name(20, 24)).unlink()
    report = await verify(fx, fx.archive_dir)
    assert not report.ok
    assert report.problems[0].startswith("entries 20 to 24: neither in the archive nor in the log")


# --- what is never pruned -----------------------------------------------------------------------------------------
async def test_only_entries_a_signed_checkpoint_covers_are_pruned(fx: Fixture) -> None:
    await fx.append(4)
    await fx.checkpoint()
    await fx.append(6)  # as old, but no checkpoint covers them yet
    fx.clock.advance(now_us() - fx.clock())
    assert await fx.retention().run_once() == 4
    assert [e.sequence for e in await stored(fx.store)] == list(range(4, 10))
    await fx.checkpoint()
    assert await fx.retention().run_once() == 6
    assert await stored(fx.store) == []
    assert await fx.store.size() == 10


async def test_a_clock_far_ahead_cannot_prune_recent_entries(fx: Fixture) -> None:
    """The service's clock (or a bug) says the entries are old; the database's own clock says no."""
    fx.clock.advance(now_us() - fx.clock())
    await fx.append(5)
    await fx.checkpoint()
    ahead = FakeClock(now_us() + 10 * DAYS * US_PER_DAY)
    with pytest.raises(Exception, match="append-only"):
        await fx.retention(clock=ahead).run_once()
    assert len(await stored(fx.store)) == 5
    assert await fx.store.archives() == []
    assert await fx.store.pruned() == 0
    assert list(fx.archive_dir.glob("segment-*")) == []  # the refused segment's file is removed again


async def test_a_file_left_by_a_crash_is_replaced(fx: Fixture) -> None:
    """A crash between a segment's file and its transaction leaves an unrecorded file: the next pass removes it."""
    await _old_then_recent(fx)
    fx.archive_dir.mkdir(parents=True)
    orphan = fx.archive_dir / archive.segment_name(0, 3)
    orphan.write_text("half a segment")
    assert await fx.retention().run_once() == 25
    assert not orphan.exists()
    assert sorted(p.name for p in fx.archive_dir.iterdir()) == [
        archive.segment_name(0, 9),
        archive.segment_name(10, 19),
        archive.segment_name(20, 24),
    ]
    report = await verify(fx, fx.archive_dir)
    assert report.ok, report.problems


async def test_a_shorter_period_is_logged_and_the_longer_one_kept(fx: Fixture) -> None:
    await _old_then_recent(fx)
    assert await fx.store.record_retention(3650, fx.clock()) == 3650  # configured earlier: ten years
    logs = LogCapture()
    retention = fx.retention(DAYS)
    assert await retention.run_once() == 0  # three-year-old entries are kept for ten years
    assert retention.effective_days == 3650
    warned = [line for line in logs.lines() if line.get("event") == "audit.retention.longer_kept"]
    assert warned and warned[0]["enforced_days"] == 3650 and warned[0]["configured_days"] == DAYS
    assert len(await stored(fx.store)) == 30
    assert await fx.store.retention_days() == 3650


async def test_an_attacker_shortening_the_period_changes_nothing(
    fx: Fixture, audit_db: AuditDatabase
) -> None:
    await _old_then_recent(fx)
    await fx.store.record_retention(3650, fx.clock())
    audit_db.execute("INSERT INTO {schema}.retention (period_days, recorded_at_us) VALUES (1, 0)")
    assert await fx.retention(3650).run_once() == 0
    assert len(await stored(fx.store)) == 30


# --- readers after pruning ----------------------------------------------------------------------------------------
async def test_tail_from_the_archived_range_names_the_archive(fx: Fixture) -> None:
    await _old_then_recent(fx)
    await fx.retention().run_once()
    servicer = AuditServicer(fx.log, fx.store)
    with pytest.raises(FailedPrecondition) as raised:
        async for _ in servicer.Tail(pb.TailRequest(start=3), None):
            pass
    assert raised.value.reason == "ARCHIVED"
    assert raised.value.metadata == {"first_available": "25"}
    stream = cast("AsyncGenerator[pb.TailResponse]", servicer.Tail(pb.TailRequest(start=25), None))
    first = await anext(stream)
    assert first.entry.sequence == 25
    await stream.aclose()


async def test_the_task_logs_a_failing_pass_and_goes_on(fx: Fixture) -> None:
    fx.clock.advance(now_us() - fx.clock())
    await fx.append(3)
    await fx.checkpoint()
    ahead = FakeClock(now_us() + 10 * DAYS * US_PER_DAY)  # every pass is refused by the database
    retention = Retention(fx.store, fx.archive_dir, DAYS, 0.001, ahead)
    logs = LogCapture()

    def failures() -> list[dict[str, object]]:
        return [line for line in logs.lines() if line.get("event") == "audit.retention.failed"]

    task = asyncio.create_task(retention.run())
    try:
        await eventually(lambda: len(failures()) >= 2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert "append-only" in str(failures()[0]["detail"])
    assert len(await stored(fx.store)) == 3
