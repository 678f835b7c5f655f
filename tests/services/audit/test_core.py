"""The audit log's core (services/audit/core.py) on the real stores (SQLite, and the machine's PostgreSQL: the
`audit_db` fixture of conftest.py) and the real codec: group commit (64
concurrent writers share few transactions, counted), durable before the answer (in a freshly opened store),
idempotent retries and conflicts (also within one batch, and per recorder), masking before any byte is made,
validation naming every bad field, size and root current (checked against an independent RFC 6962 computation
over the stored bytes, and after a restart), proofs verified by tradeguard.audit.tlog, `wait_for` woken by a
commit, and a whole-batch failure failing every caller of that batch with nothing taken as done; validation's fast
path agrees with its checks one by one (hypothesis, at every boundary)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.audit import codec
from services.audit.core import (
    MAX_DETAILS,
    MAX_FUTURE_US,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    MAX_VALUE_CHARS,
    MIN_TIME_US,
    AuditLog,
)
from services.audit.masking import MASK
from services.audit.model import (
    TEXT_FIELDS,
    Appended,
    Checkpoint,
    Event,
    Outcome,
    Pending,
    Query,
    StoredEntry,
)
from services.audit.store import Archive, AuditStore, EventIdConflict
from tests.services.audit.conftest import AuditDatabase
from tradeguard.audit import tlog
from tradeguard.errors import InvalidArgument
from tradeguard.testing import FakeClock

RECORDER = "spiffe://tradeguard.local/ns/default/sa/trading"
OTHER = "spiffe://tradeguard.local/ns/default/sa/auth"


class StoreFailed(RuntimeError):
    """The store's transaction failed (injected)."""


class CountingStore:
    """A real store, counting its append transactions; `fail_next` makes the next one fail before it
    reaches the database (BEGIN failed)."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self.appends = 0
        self.entries_per_append: list[int] = []
        self.fail_next = False

    async def append(self, batch: Sequence[Pending]) -> list[Appended | EventIdConflict]:
        self.appends += 1
        self.entries_per_append.append(len(batch))
        if self.fail_next:
            self.fail_next = False
            raise StoreFailed("database is locked")
        return await self.store.append(batch)

    async def size(self) -> int:
        return await self.store.size()

    async def nodes(self, keys: Sequence[tuple[int, int]]) -> list[bytes]:
        return await self.store.nodes(keys)

    async def entries(self, start: int, count: int) -> list[StoredEntry]:
        return await self.store.entries(start, count)

    async def rows(self, start: int, count: int) -> list[tuple[Any, ...]]:
        return await self.store.rows(start, count)

    async def query(self, query: Query, after: int, limit: int) -> list[StoredEntry]:
        return await self.store.query(query, after, limit)

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        await self.store.add_checkpoint(checkpoint)

    async def latest_checkpoint(self) -> Checkpoint | None:
        return await self.store.latest_checkpoint()

    async def checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]:
        return await self.store.checkpoints(after_size, limit)

    async def pruned(self) -> int:
        return await self.store.pruned()

    async def expired(self, before_us: int, below: int, limit: int) -> list[StoredEntry]:
        return await self.store.expired(before_us, below, limit)

    async def prune(self, archive: Archive) -> None:
        await self.store.prune(archive)

    async def archives(self) -> list[Archive]:
        return await self.store.archives()

    async def retention_days(self) -> int | None:
        return await self.store.retention_days()

    async def record_retention(self, days: int, at_us: int) -> int:
        return await self.store.record_retention(days, at_us)

    async def close(self) -> None:
        await self.store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(audit_db: AuditDatabase) -> CountingStore:
    return CountingStore(await audit_db.open())  # closed by audit_db


@pytest.fixture
async def log(store: CountingStore, clock: FakeClock) -> AsyncIterator[AuditLog]:
    audit_log = AuditLog(store, codec.encode_entry, codec.event_digest, clock)
    await audit_log.open()
    yield audit_log
    await audit_log.close()


def event(clock: FakeClock, event_id: str, **fields: object) -> Event:
    base = Event(event_id=event_id, time_us=clock() - 1000, outcome=Outcome.OK, method="/t.v1.Trading/Place")
    return replace(base, **fields)  # type: ignore[arg-type]


async def stored(db: AuditDatabase) -> list[StoredEntry]:
    """Every entry, read through a store opened afresh on the same database."""
    fresh = await db.open()
    return await fresh.entries(0, 100_000)


def independent_root(entries: Sequence[StoredEntry]) -> bytes:
    return tlog.root([tlog.leaf_hash(e.entry_bytes) for e in entries])


# --- appending ---------------------------------------------------------------------------------------------


async def test_an_append_answers_once_durable(
    log: AuditLog, audit_db: AuditDatabase, clock: FakeClock
) -> None:
    (result,) = await log.append([event(clock, "e-1", principal="alice")], RECORDER)
    assert isinstance(result, Appended)
    assert (result.sequence, result.created) == (0, True)
    (entry,) = await stored(audit_db)
    assert entry.sequence == 0
    assert entry.leaf_hash == result.leaf_hash == tlog.leaf_hash(entry.entry_bytes)
    decoded = codec.decode_entry(entry.entry_bytes)
    assert (decoded.recorder, decoded.record_time_us) == (RECORDER, clock())
    assert decoded.event == event(clock, "e-1", principal="alice")
    assert (log.size, log.root) == (1, independent_root([entry]))


async def test_concurrent_appends_share_few_transactions_and_each_is_durable_when_answered(
    log: AuditLog, store: CountingStore, audit_db: AuditDatabase, clock: FakeClock
) -> None:
    writers, rounds = 64, 20
    answered: dict[str, Appended] = {}

    async def writer(w: int) -> None:
        for r in range(rounds):
            (result,) = await log.append([event(clock, f"w{w}-r{r}")], RECORDER)
            assert isinstance(result, Appended)
            answered[f"w{w}-r{r}"] = result

    await asyncio.gather(*(writer(w) for w in range(writers)))
    total = writers * rounds
    assert len(answered) == total
    assert store.appends == log.batcher.batches
    assert store.appends <= total // 8, store.entries_per_append  # group commit: many appends per transaction
    assert max(store.entries_per_append) > 1
    entries = await stored(audit_db)
    assert [e.sequence for e in entries] == list(range(total))
    by_id = {codec.decode_entry(e.entry_bytes).event.event_id: e for e in entries}
    for event_id, result in answered.items():
        assert by_id[event_id].sequence == result.sequence
        assert by_id[event_id].leaf_hash == result.leaf_hash
    assert (log.size, log.root) == (total, independent_root(entries))


async def test_a_batch_is_one_transaction_in_order(
    log: AuditLog, store: CountingStore, clock: FakeClock
) -> None:
    results = await log.append([event(clock, f"b-{i}") for i in range(300)], RECORDER)
    assert [r.sequence for r in results if isinstance(r, Appended)] == list(range(300))
    assert store.entries_per_append == [300]


async def test_an_answered_append_survives_a_restart_and_the_tree_is_reloaded(
    log: AuditLog, audit_db: AuditDatabase, clock: FakeClock
) -> None:
    for i in range(13):
        await log.append([event(clock, f"r-{i}")], RECORDER)
    await log.close()
    again = CountingStore(await audit_db.open())
    reopened = AuditLog(again, codec.encode_entry, codec.event_digest, clock)
    await reopened.open()
    assert (reopened.size, reopened.root) == (13, log.root)
    assert reopened.root == independent_root(await stored(audit_db))
    await reopened.append([event(clock, "r-13")], RECORDER)
    assert reopened.size == 14
    assert reopened.root == independent_root(await stored(audit_db))
    await reopened.close()


async def test_retries_are_idempotent(log: AuditLog, audit_db: AuditDatabase, clock: FakeClock) -> None:
    first = event(clock, "same", principal="alice")
    (one,) = await log.append([first], RECORDER)
    clock.advance_s(5)  # another record time: still the same event
    (two,) = await log.append([first], RECORDER)
    assert isinstance(one, Appended)
    assert two == Appended(one.sequence, one.leaf_hash, created=False)
    in_batch = await log.append([event(clock, "twice"), event(clock, "twice")], RECORDER)
    assert [(r.sequence, r.created) for r in in_batch if isinstance(r, Appended)] == [(1, True), (1, False)]
    assert log.size == 2
    assert len(await stored(audit_db)) == 2


async def test_a_reused_event_id_is_a_conflict_and_the_others_are_recorded(
    log: AuditLog, audit_db: AuditDatabase, clock: FakeClock
) -> None:
    await log.append([event(clock, "id-1", principal="alice")], RECORDER)
    results = await log.append(
        [event(clock, "id-2"), event(clock, "id-1", principal="mallory"), event(clock, "id-3")], RECORDER
    )
    assert isinstance(results[1], EventIdConflict)
    assert [(r.sequence, r.created) for r in results if isinstance(r, Appended)] == [(1, True), (2, True)]
    (other,) = await log.append([event(clock, "id-1", principal="mallory")], OTHER)  # another recorder's id
    assert isinstance(other, Appended)
    assert (other.sequence, other.created) == (3, True)
    entries = await stored(audit_db)
    assert len(entries) == 4
    assert log.root == independent_root(entries)


async def test_events_are_masked_before_any_byte_is_made(
    log: AuditLog, audit_db: AuditDatabase, clock: FakeClock
) -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTcwMDAwMDAwMH0.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl"
    secret = "tgs_" + "Ab3" * 14 + "x"
    raw = event(
        clock,
        "m-1",
        resource=f"Authorization: Bearer {jwt}",
        details={"password": "hunter2", "note": f"secret {secret} inside"},
    )
    await log.append([raw], RECORDER)
    (entry,) = await stored(audit_db)
    for text in (jwt, secret, "hunter2", "Bearer " + jwt[:10]):
        assert text.encode() not in entry.entry_bytes
    recorded = codec.decode_entry(entry.entry_bytes).event
    assert recorded.details == {"password": MASK, "note": f"secret {MASK} inside"}
    assert MASK in recorded.resource
    (again,) = await log.append([raw], RECORDER)  # the digest is the masked event's: a retry is the same
    assert isinstance(again, Appended) and not again.created


async def test_validation_names_every_bad_field(log: AuditLog, clock: FakeClock) -> None:
    bad = Event(
        event_id="has space",
        time_us=0,
        outcome=Outcome.UNSPECIFIED,
        latency_us=-1,
        clock_estimated_error_us=-1,
        clock_max_error_us=-2,
        principal="p" * (MAX_TEXT_CHARS + 1),
        details={"n" * 2000: "v"},
    )
    with pytest.raises(InvalidArgument) as caught:
        log.validate(bad, "event")
    assert [v.field for v in caught.value.violations] == [
        "event.event_id",
        "event.time",
        "event.outcome",
        "event.latency",
        "event.clock.estimated_error_us",
        "event.clock.max_error_us",
        "event.principal",
        "event.details",
    ]
    assert "n" * 100 not in str(caught.value)  # never echoed
    cases = {
        "": "event.event_id",
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.": "event.event_id",  # looks like a token
    }
    for event_id, field in cases.items():
        with pytest.raises(InvalidArgument) as caught:
            log.validate(event(clock, event_id), "event")
        assert [v.field for v in caught.value.violations] == [field]
    for time_us in (1, 946_684_799_999_999, clock() + 86_400_000_001):
        with pytest.raises(InvalidArgument) as caught:
            log.validate(event(clock, "ok", time_us=time_us), "event")
        assert [v.field for v in caught.value.violations] == ["event.time"]
    log.validate(event(clock, "ok", time_us=clock() + 86_400_000_000), "event")


BOUNDARY_TIMES = st.sampled_from(
    [0, 1, MIN_TIME_US - 1, MIN_TIME_US, 1_700_000_000_000_000, 1_700_000_000_000_000 + MAX_FUTURE_US, 2**62]
)
SIGNED = st.sampled_from([-(2**63), -1, 0, 1, 2**63 - 1])
LENGTHS = st.sampled_from([0, 1, MAX_TEXT_CHARS, MAX_TEXT_CHARS + 1])
IDS = st.one_of(
    st.sampled_from(["", "ok", "a" * 128, "a" * 129, "has space", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."]),
    st.text(st.sampled_from("ab09_.:-/ eyJtgs"), max_size=40),
    st.binary(min_size=20, max_size=32).map(bytes.hex),
)


@settings(max_examples=300)
@given(
    event_id=IDS,
    time_us=BOUNDARY_TIMES,
    outcome=st.sampled_from(Outcome),
    latency_us=SIGNED,
    estimated=SIGNED,
    maximum=SIGNED,
    where=st.sampled_from(TEXT_FIELDS),
    length=LENGTHS,
    details=st.dictionaries(
        st.sampled_from(["a", "n" * (MAX_NAME_CHARS + 1)]),
        st.sampled_from(["", "v" * (MAX_VALUE_CHARS + 1)]),
        max_size=2,
    ),
    many=st.booleans(),
)
def test_the_fast_path_of_validation_agrees_with_the_checks_one_by_one(
    event_id: str,
    time_us: int,
    outcome: Outcome,
    latency_us: int,
    estimated: int,
    maximum: int,
    where: str,
    length: int,
    details: dict[str, str],
    many: bool,
) -> None:
    clock = FakeClock(1_700_000_000_000_000)
    audit_log = AuditLog(cast("AuditStore", None), codec.encode_entry, codec.event_digest, clock)
    if many:
        details = {**details, **{f"d{i}": "v" for i in range(MAX_DETAILS + 1)}}
    candidate = Event(
        event_id=event_id,
        time_us=time_us,
        outcome=outcome,
        latency_us=latency_us,
        clock_estimated_error_us=estimated,
        clock_max_error_us=maximum,
        details=details,
        **{where: "x" * length},  # type: ignore[arg-type]
    )
    expected = audit_log.violations(candidate, "event")
    if expected:
        with pytest.raises(InvalidArgument) as caught:
            audit_log.validate(candidate, "event")
        assert caught.value.violations == expected
    else:
        audit_log.validate(candidate, "event")


async def test_append_validates_every_event_and_appends_nothing_when_one_is_bad(
    log: AuditLog, store: CountingStore, clock: FakeClock
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await log.append([event(clock, "good"), event(clock, "bad", outcome=Outcome.UNSPECIFIED)], RECORDER)
    assert [v.field for v in caught.value.violations] == ["events[1].outcome"]
    assert (store.appends, log.size) == (0, 0)
    with pytest.raises(InvalidArgument) as caught:
        await log.append([event(clock, f"x{i}") for i in range(1001)], RECORDER)
    assert [v.field for v in caught.value.violations] == ["events"]
    assert await log.append([], RECORDER) == []
    with pytest.raises(InvalidArgument) as caught:  # named as the caller names them
        await log.append([event(clock, "has space"), event(clock, "ok", latency_us=-1)], RECORDER, ("a", "b"))
    assert [v.field for v in caught.value.violations] == ["a.event_id", "b.latency"]
    with pytest.raises(ValueError, match="field names"):
        await log.append([event(clock, "good")], RECORDER, ("a", "b"))
    assert (store.appends, log.size) == (0, 0)


async def test_record_times_never_go_back(
    store: CountingStore, audit_db: AuditDatabase, clock: FakeClock
) -> None:
    now = [clock()]  # a wall clock that steps back
    stepping = AuditLog(store, codec.encode_entry, codec.event_digest, lambda: now[0])
    await stepping.open()
    await stepping.append([event(clock, "t-1")], RECORDER)
    now[0] -= 10_000_000
    await stepping.append([event(clock, "t-2")], RECORDER)
    await stepping.close()
    one, two = (codec.decode_entry(e.entry_bytes).record_time_us for e in await stored(audit_db))
    assert one == two == clock()


# --- waiting, failing --------------------------------------------------------------------------------------


async def test_wait_for_wakes_on_the_commit(log: AuditLog, clock: FakeClock) -> None:
    waiter = asyncio.create_task(log.wait_for(2))
    await log.append([event(clock, "w-1")], RECORDER)
    for _ in range(10):
        await asyncio.sleep(0)
    assert not waiter.done()
    await log.append([event(clock, "w-2")], RECORDER)
    await asyncio.wait_for(waiter, 10)
    await asyncio.wait_for(log.wait_for(1), 10)  # already there: at once


async def test_a_whole_batch_failure_fails_every_caller_and_nothing_is_taken_as_done(
    log: AuditLog, store: CountingStore, audit_db: AuditDatabase, clock: FakeClock
) -> None:
    await log.append([event(clock, "before")], RECORDER)
    size, root = log.size, log.root
    store.fail_next = True
    results = await asyncio.gather(
        *(log.append([event(clock, f"f-{i}")], RECORDER) for i in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, StoreFailed) for r in results), results
    assert store.entries_per_append[-1] == 10  # one batch, all of them
    assert (log.size, log.root) == (size, root)
    assert len(await stored(audit_db)) == 1
    waiter = asyncio.create_task(log.wait_for(2))
    retried = await asyncio.gather(*(log.append([event(clock, f"f-{i}")], RECORDER) for i in range(10)))
    assert [r.sequence for (r,) in retried if isinstance(r, Appended)] == list(range(1, 11))
    await asyncio.wait_for(waiter, 10)
    assert log.root == independent_root(await stored(audit_db))


# --- proofs ------------------------------------------------------------------------------------------------


async def test_proofs_verify_against_the_roots(
    log: AuditLog, audit_db: AuditDatabase, clock: FakeClock
) -> None:
    roots = {0: log.root}
    for i in range(21):
        await log.append([event(clock, f"p-{i}")], RECORDER)
        roots[log.size] = log.root
    entries = await stored(audit_db)
    for size in (1, 2, 7, 8, 13, 21):
        assert await log.root_at(size) == roots[size]
        for index in range(size):
            proof = await log.inclusion_proof(index, size)
            assert tlog.verify_inclusion(entries[index].leaf_hash, index, size, proof, roots[size])
        for first in range(1, size + 1):
            proof = await log.consistency_proof(first, size)
            assert tlog.verify_consistency(first, size, proof, roots[first], roots[size])
    with pytest.raises(ValueError, match="21 entries"):
        await log.inclusion_proof(0, 22)
