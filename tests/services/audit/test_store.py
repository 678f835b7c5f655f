"""The AuditStore contract (services/audit/store.py), run against real SQLite and real PostgreSQL (the `audit_db`
fixture of conftest.py): sequence numbers without gaps, batches, idempotent retries and event id conflicts (also
within one batch), the Merkle tree's nodes against a brute-force recomputation (roots and proofs, verified with
tradeguard.audit.tlog), the database refusing UPDATE, DELETE and TRUNCATE from a direct connection as an attacker
would use it, PostgreSQL's writer role, restarts, a failing batch committing nothing, a second writer, queries
with paging, and checkpoints; retention: an archived, expired prefix pruned in one transaction with its archive
record, the tree and proofs intact after it, and the database refusing early, unarchived or shortened-period
deletes (as an attacker with the database would try them), PostgreSQL's pruner role."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from services.audit import tree
from services.audit.model import Appended, Checkpoint, Entry, Event, Outcome, Pending, Query, StoredEntry
from services.audit.store import Archive, AuditStore, EventIdConflict
from services.audit.store_postgres import COPY_FROM
from tests.support import PG_DSN
from tradeguard.audit import tlog
from tradeguard.storage.migrations import SchemaTooNew

from .conftest import AuditDatabase

T0 = 1_700_000_000_000_000
TRADING = "spiffe://tradeguard.local/trading"
AUTH = "spiffe://tradeguard.local/auth"


def pending(n: int, *, recorder: str = TRADING, event_id: str | None = None, **fields: Any) -> Pending:
    """A pending entry; its bytes stand in for the codec's (the store keeps and hashes-by-caller any bytes)."""
    values: dict[str, Any] = {
        "event_id": event_id or f"ev-{n}",
        "time_us": T0 + n * 1000,
        "outcome": Outcome.OK,
        "method": "/tradeguard.trading.v1.TradingService/PlaceOrder",
        "principal": "alice",
        "account_id": "acct-1",
        "api_key_id": "tgk_1",
    }
    values.update(fields)
    event = Event(**values)
    entry = Entry(record_time_us=T0 + n * 1000 + 7, recorder=recorder, event=event)
    data = repr(entry).encode()
    return Pending(entry, data, tlog.leaf_hash(data), hashlib.sha256(repr(event).encode()).digest())


def created(results: Sequence[Appended | EventIdConflict]) -> list[int]:
    out = []
    for result in results:
        assert isinstance(result, Appended) and result.created, result
        out.append(result.sequence)
    return out


async def append_all(store: AuditStore, items: Sequence[Pending], batch: int) -> None:
    for start in range(0, len(items), batch):
        created(await store.append(items[start : start + batch]))


# --- sequences, batches, entries ---------------------------------------------------------------------------------
async def test_sequences_without_gaps_in_singles_and_batches(audit_store: AuditStore) -> None:
    assert await audit_store.size() == 0
    assert await audit_store.append([]) == []
    items = [pending(n) for n in range(12)]
    assert created(await audit_store.append(items[:1])) == [0]
    assert created(await audit_store.append(items[1:5])) == [1, 2, 3, 4]
    assert created(await audit_store.append(items[5:6])) == [5]
    assert created(await audit_store.append(items[6:])) == list(range(6, 12))
    assert await audit_store.size() == 12
    stored = await audit_store.entries(0, 100)
    assert stored == [StoredEntry(n, p.entry_bytes, p.leaf_hash) for n, p in enumerate(items)]
    assert await audit_store.entries(3, 2) == stored[3:5]
    assert await audit_store.entries(11, 5) == stored[11:]
    assert await audit_store.entries(12, 5) == []
    assert await audit_store.entries(4, 0) == []
    results = await audit_store.append([pending(20)])
    assert results == [Appended(12, pending(20).leaf_hash)]
    with pytest.raises(ValueError):
        await audit_store.entries(-1, 2)


# --- idempotency ---------------------------------------------------------------------------------------------
async def test_a_retry_answers_the_first_entry_and_another_event_conflicts(audit_store: AuditStore) -> None:
    first = [pending(0), pending(1), pending(2)]
    created(await audit_store.append(first))
    changed = pending(7, event_id="ev-1")  # the same event id, another event
    assert changed.event_digest != first[1].event_digest
    results = await audit_store.append([pending(3), first[1], changed, pending(4), first[0]])
    assert results[0] == Appended(3, pending(3).leaf_hash)
    assert results[1] == Appended(1, first[1].leaf_hash, created=False)
    conflict = results[2]
    assert isinstance(conflict, EventIdConflict)
    assert conflict.reason == "EVENT_ID_CONFLICT" and conflict.metadata == {"event_id": "ev-1"}
    assert results[3] == Appended(4, pending(4).leaf_hash)  # no gap where the conflict was
    assert results[4] == Appended(0, first[0].leaf_hash, created=False)
    assert await audit_store.size() == 5
    assert [e.entry_bytes for e in await audit_store.entries(0, 10)] == [
        p.entry_bytes for p in (*first, pending(3), pending(4))
    ]


async def test_duplicates_within_one_batch(audit_store: AuditStore) -> None:
    a, other = pending(0, event_id="x"), pending(1, event_id="x")
    results = await audit_store.append([a, pending(2), a, other, a])
    assert results[:3] == [
        Appended(0, a.leaf_hash),
        Appended(1, pending(2).leaf_hash),
        Appended(0, a.leaf_hash, False),
    ]
    assert isinstance(results[3], EventIdConflict)
    assert results[4] == Appended(0, a.leaf_hash, created=False)
    assert await audit_store.size() == 2


async def test_large_batches_of_two_recorders_and_their_retries(
    audit_db: AuditDatabase, audit_store: AuditStore
) -> None:
    """Batches larger than one statement's rows (the SQLite store writes a batch in statements of up to 64 rows
    and looks its event ids up 64 at a time): every row and node in place, in order, and a retry of all of them,
    mixed with new events, answers each one's first entry."""
    first = [pending(n, recorder=(TRADING, AUTH)[n % 2], event_id=f"big-{n // 2}") for n in range(150)]
    assert created(await audit_store.append(first)) == list(range(150))
    second = [pending(n) for n in range(150, 251)]
    assert created(await audit_store.append(second)) == list(range(150, 251))
    items = [*first, *second]
    stored = await audit_store.entries(0, 300)
    assert [(e.sequence, e.entry_bytes) for e in stored] == [(n, p.entry_bytes) for n, p in enumerate(items)]
    expected = all_subtrees([p.leaf_hash for p in items])
    assert audit_db.count("nodes") == len(expected)
    assert await audit_store.nodes(sorted(expected)) == [expected[k] for k in sorted(expected)]
    retry = [pending(n) for n in range(251, 281)] + items[::-1]
    results = await audit_store.append(retry)
    assert results[:30] == [Appended(251 + n, pending(251 + n).leaf_hash) for n in range(30)]
    assert results[30:] == [Appended(n, items[n].leaf_hash, created=False) for n in reversed(range(251))]
    assert await audit_store.size() == 281


async def test_event_ids_are_per_recorder(audit_store: AuditStore) -> None:
    results = await audit_store.append(
        [pending(0, event_id="same"), pending(0, event_id="same", recorder=AUTH)]
    )
    assert created(results) == [0, 1]


async def test_a_batch_of_conflicts_and_retries_only_writes_nothing(audit_store: AuditStore) -> None:
    created(await audit_store.append([pending(0)]))
    results = await audit_store.append([pending(0), pending(5, event_id="ev-0")])
    assert results[0] == Appended(0, pending(0).leaf_hash, created=False)
    assert isinstance(results[1], EventIdConflict)
    assert await audit_store.size() == 1
    assert created(await audit_store.append([pending(1)])) == [1]


# --- the Merkle tree's nodes -------------------------------------------------------------------------------------
def all_subtrees(leaves: Sequence[bytes]) -> dict[tuple[int, int], bytes]:
    out: dict[tuple[int, int], bytes] = {}
    level = 0
    while (1 << level) <= len(leaves):
        width = 1 << level
        for index in range(len(leaves) // width):
            out[(level, index)] = tlog.root(leaves[index * width : (index + 1) * width])
        level += 1
    return out


@pytest.mark.parametrize("batch", [1, 3, 8, 20])  # 20: PostgreSQL writes with COPY
async def test_nodes_roots_and_proofs_match_a_recomputation(
    audit_db: AuditDatabase, audit_store: AuditStore, batch: int
) -> None:
    items = [pending(n) for n in range(40)]
    leaves = [p.leaf_hash for p in items]
    await append_all(audit_store, items, batch)
    expected = all_subtrees(leaves)
    keys = sorted(expected)
    assert await audit_store.nodes(keys) == [expected[k] for k in keys]
    assert audit_db.count("nodes") == len(expected)  # no node more than the complete subtrees
    for size2 in range(41):
        root2 = await tree.root_at(size2, audit_store.nodes)
        assert root2 == tlog.root(leaves[:size2])
        for index in range(size2):
            proof = await tree.inclusion_proof(index, size2, audit_store.nodes)
            assert tlog.verify_inclusion(leaves[index], index, size2, proof, root2)
        for size1 in range(1, size2 + 1):
            proof = await tree.consistency_proof(size1, size2, audit_store.nodes)
            assert tlog.verify_consistency(size1, size2, proof, tlog.root(leaves[:size1]), root2)
    with pytest.raises(KeyError):
        await audit_store.nodes([(0, 39), (0, 40)])
    with pytest.raises(KeyError):
        await tree.root_at(41, audit_store.nodes)


# --- append-only, enforced by the database ------------------------------------------------------------------------
async def _filled(audit_store: AuditStore) -> None:
    created(await audit_store.append([pending(n) for n in range(5)]))
    await audit_store.add_checkpoint(
        Checkpoint(5, tlog.root([pending(n).leaf_hash for n in range(5)]), "note", T0)
    )


ATTACKS = [
    "UPDATE {schema}.entries SET principal = 'mallory' WHERE sequence = 1",
    "UPDATE {schema}.entries SET entry_bytes = entry_bytes WHERE sequence = 2",
    "DELETE FROM {schema}.entries WHERE sequence = 4",
    "DELETE FROM {schema}.entries",
    "UPDATE {schema}.nodes SET hash = hash WHERE level = 0",
    "DELETE FROM {schema}.nodes WHERE level = 2",
    "UPDATE {schema}.checkpoints SET note = 'forged'",
    "DELETE FROM {schema}.checkpoints",
]
SQLITE_ATTACKS = [
    "INSERT OR REPLACE INTO entries SELECT * FROM entries WHERE sequence = 1",
    "REPLACE INTO nodes (level, idx, hash) VALUES (0, 0, x'00')",
    "INSERT OR REPLACE INTO checkpoints (tree_size, root_hash, note, time_us) VALUES (5, x'00', 'forged', 0)",
]
PG_ATTACKS = [
    "TRUNCATE {schema}.entries",
    "TRUNCATE {schema}.nodes",
    "TRUNCATE {schema}.checkpoints",
    "INSERT INTO {schema}.checkpoints VALUES (5, '\\x00', 'forged', 0) "
    "ON CONFLICT (tree_size) DO UPDATE SET note = excluded.note",
    "INSERT INTO {schema}.nodes VALUES (0, 0, '\\x00') ON CONFLICT (level, idx) DO UPDATE SET hash = excluded.hash",
]


def snapshot(audit_db: AuditDatabase) -> list[list[tuple[Any, ...]]]:
    return [
        audit_db.execute("SELECT * FROM {schema}.entries ORDER BY sequence"),
        audit_db.execute("SELECT * FROM {schema}.nodes ORDER BY level, idx"),
        audit_db.execute("SELECT * FROM {schema}.checkpoints ORDER BY tree_size"),
    ]


async def test_the_database_refuses_updates_and_deletes(
    audit_db: AuditDatabase, audit_store: AuditStore
) -> None:
    """A direct connection (as the tables' owner: the file's owner, the PostgreSQL superuser) is refused."""
    await _filled(audit_store)
    before = snapshot(audit_db)
    attacks = ATTACKS + (SQLITE_ATTACKS if audit_db.kind == "sqlite" else PG_ATTACKS)
    for attack in attacks:
        error = sqlite3.IntegrityError if audit_db.kind == "sqlite" else psycopg.errors.RaiseException
        with pytest.raises(error, match="append-only"):
            audit_db.execute(attack)
    assert snapshot(audit_db) == before
    assert await audit_store.size() == 5


async def test_postgres_writer_role_may_only_select_and_insert(pg_audit_db: AuditDatabase) -> None:
    audit_db = pg_audit_db
    await _filled(await audit_db.open())
    before = snapshot(audit_db)
    schema = sql.Identifier(audit_db.schema)
    with psycopg.connect(PG_DSN, autocommit=True) as pg:
        pg.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(audit_db.writer)))
        refused = [attack.replace("{schema}", "{}") for attack in ATTACKS + PG_ATTACKS[:3]] + [
            "ALTER TABLE {}.entries DISABLE TRIGGER USER",
            "DROP TRIGGER entries_append_only ON {}.entries",
            "DROP TABLE {}.checkpoints",
            "CREATE TABLE {}.sneaky (x int)",
        ]
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                pg.execute(sql.SQL(statement).format(schema))
        cur = pg.execute(sql.SQL("SELECT count(*) FROM {}.entries").format(schema))
        assert cur.fetchone() == (5,)
        pg.execute(sql.SQL("INSERT INTO {}.checkpoints VALUES (6, '\\x00', 'n', 0)").format(schema))
    after = snapshot(audit_db)
    assert after[:2] == before[:2] and len(after[2]) == 2


async def test_postgres_service_as_the_writer_role(pg_audit_db: AuditDatabase) -> None:
    """Production: the owner migrates; the service logs in as a member of the writer role and never migrates."""
    audit_db = pg_audit_db
    login = audit_db.service_login
    service_dsn = PG_DSN.replace("user=postgres", f"user={login}")
    assert service_dsn != PG_DSN
    with psycopg.connect(PG_DSN, autocommit=True) as pg:
        pg.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(login)))
    with pytest.raises(RuntimeError, match="run the migration as the schema's owner"):
        await audit_db.open(service_dsn, migrate=False)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # not migrated yet: the service cannot
        await audit_db.open(service_dsn)
    owner = await audit_db.open()
    created(await owner.append([pending(0)]))
    with psycopg.connect(PG_DSN, autocommit=True) as pg:
        pg.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(audit_db.writer), sql.Identifier(login)))
    service = await audit_db.open(service_dsn)  # at the last version: read, not migrated
    assert created(await service.append([pending(1), pending(2)])) == [1, 2]
    assert await service.append([pending(1)]) == [Appended(1, pending(1).leaf_hash, created=False)]
    await service.add_checkpoint(Checkpoint(3, await tree.root_at(3, service.nodes), "note", T0))
    assert len(await service.query(Query(principal="alice"), -1, 10)) == 3
    assert await tree.root_at(3, owner.nodes) == tlog.root([pending(n).leaf_hash for n in range(3)])
    with (
        psycopg.connect(service_dsn, autocommit=True) as pg,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        pg.execute(sql.SQL("DELETE FROM {}.entries").format(sql.Identifier(audit_db.schema)))


# --- durability and failure -----------------------------------------------------------------------------------
async def test_a_reopened_store_sees_everything_and_continues_the_tree(audit_db: AuditDatabase) -> None:
    items = [pending(n) for n in range(23)]
    store = await audit_db.open()
    await append_all(store, items[:13], 5)
    checkpoint = Checkpoint(13, tlog.root([p.leaf_hash for p in items[:13]]), "note 13", T0)
    await store.add_checkpoint(checkpoint)
    await store.close()
    reopened = await audit_db.open()
    assert await reopened.size() == 13
    assert [e.entry_bytes for e in await reopened.entries(0, 50)] == [p.entry_bytes for p in items[:13]]
    assert await reopened.latest_checkpoint() == checkpoint
    assert created(await reopened.append(items[13:])) == list(range(13, 23))  # the right edge reloaded
    assert await reopened.append([items[3]]) == [Appended(3, items[3].leaf_hash, created=False)]
    leaves = [p.leaf_hash for p in items]
    keys = sorted(all_subtrees(leaves))
    assert await reopened.nodes(keys) == [all_subtrees(leaves)[k] for k in keys]


async def test_a_schema_newer_than_the_code_is_refused(audit_db: AuditDatabase) -> None:
    store = await audit_db.open()
    created(await store.append([pending(0)]))
    await store.close()
    audit_db.execute("INSERT INTO {schema}.schema_version (version) VALUES (99)")
    with pytest.raises(SchemaTooNew):
        await audit_db.open()


@pytest.mark.parametrize("size", [3, COPY_FROM + 5])
async def test_a_failing_batch_commits_nothing(
    audit_db: AuditDatabase, audit_store: AuditStore, size: int
) -> None:
    created(await audit_store.append([pending(n) for n in range(3)]))
    before = snapshot(audit_db)
    broken = dataclasses.replace(pending(4), entry_bytes=None)  # type: ignore[arg-type]  # NOT NULL refuses it
    batch = [pending(3), *(pending(100 + n) for n in range(size - 2)), broken]
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.NotNullViolation)):
        await audit_store.append(batch)
    assert snapshot(audit_db) == before
    assert await audit_store.size() == 3
    assert created(await audit_store.append([pending(3), pending(4)])) == [3, 4]  # the same numbers, no gap
    leaves = [pending(n).leaf_hash for n in range(5)]
    assert await tree.root_at(5, audit_store.nodes) == tlog.root(leaves)


REPO = Path(__file__).resolve().parents[3]
CRASHING_WRITER = """
import asyncio, hashlib, sys
from pathlib import Path
from services.audit.model import Entry, Event, Outcome, Pending
from services.audit.store_postgres import PostgresAuditStore
from services.audit.store_sqlite import SqliteAuditStore

async def main(kind: str, where: str) -> None:
    if kind == "sqlite":
        store = await SqliteAuditStore.open(Path(where))
    else:
        dsn, schema = where.split(" ", 1)
        store = await PostgresAuditStore.open(dsn, schema=schema)
    n = 0
    while True:  # until killed
        batch = []
        for _ in range(1 + n % 20):
            event = Event(event_id=f"crash-{n}", time_us=n, outcome=Outcome.OK)
            data = repr(Entry(record_time_us=n, recorder="r", event=event)).encode()
            batch.append(Pending(Entry(n, "r", event), data, hashlib.sha256(b"\\x00" + data).digest(), data[:32]))
            n += 1
        results = await store.append(batch)
        print(" ".join(str(r.sequence) for r in results), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_kill_9_during_appends_loses_no_acknowledged_entry(audit_db: AuditDatabase) -> None:
    """A writer process killed (SIGKILL) in a stream of appends: after reopening, every append it was answered
    for is there, the log is gapless, its nodes are its tree's, and appending continues."""
    where = str(audit_db.path) if audit_db.kind == "sqlite" else f"{PG_DSN} {audit_db.schema}"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_WRITER, audit_db.kind, where, stdout=asyncio.subprocess.PIPE, cwd=REPO
    )
    assert child.stdout is not None
    acknowledged: list[int] = []
    try:
        while len(acknowledged) < 300:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            assert line, "the writer exited"
            acknowledged.extend(int(seq) for seq in line.split())
    finally:
        child.kill()
        await child.wait()
    assert acknowledged == list(range(len(acknowledged)))
    store = await audit_db.open()
    size = await store.size()
    assert size >= len(acknowledged)
    stored = await store.entries(0, size)
    assert [e.sequence for e in stored] == list(range(size))
    subtrees = all_subtrees([e.leaf_hash for e in stored])
    assert audit_db.count("nodes") == len(subtrees)
    assert await store.nodes(sorted(subtrees)) == [subtrees[k] for k in sorted(subtrees)]
    assert created(await store.append([pending(0)])) == [size]


async def test_a_second_writer_on_the_same_database(audit_db: AuditDatabase) -> None:
    """Never the service's way (one writer), but a store whose cached right edge went stale writes right."""
    first, second = await audit_db.open(), await audit_db.open()
    created(await first.append([pending(n) for n in range(5)]))
    assert created(await second.append([pending(n) for n in range(5, 11)])) == list(range(5, 11))
    assert created(await first.append([pending(11)])) == [11]
    assert await first.append([pending(6)]) == [Appended(6, pending(6).leaf_hash, created=False)]
    leaves = [pending(n).leaf_hash for n in range(12)]
    expected = all_subtrees(leaves)
    assert await second.nodes(sorted(expected)) == [expected[k] for k in sorted(expected)]
    assert audit_db.count("nodes") == len(expected)


async def test_two_writers_racing_never_corrupt_the_log(audit_db: AuditDatabase) -> None:
    """Two stores appending at once (a misconfiguration: the service has one writer): an append may fail as a
    whole (PostgreSQL: the keys refuse the loser) and is retried; the log ends gapless, every entry once, and its
    nodes are exactly the tree of the stored leaves."""
    stores = [await audit_db.open(), await audit_db.open()]

    async def writer(w: int) -> None:
        store = stores[w]
        for k in range(15):
            batch = [pending(1000 * w + 10 * k + i) for i in range(3)]
            for _attempt in range(50):
                try:
                    results = await store.append(batch)
                except (sqlite3.Error, psycopg.Error):
                    continue
                assert all(isinstance(r, Appended) for r in results)
                break
            else:
                pytest.fail("an append kept failing")

    await asyncio.gather(writer(0), writer(1))
    stored = await stores[0].entries(0, 1000)
    assert [e.sequence for e in stored] == list(range(90))
    expected = {
        pending(1000 * w + 10 * k + i).entry_bytes for w in range(2) for k in range(15) for i in range(3)
    }
    assert {e.entry_bytes for e in stored} == expected
    subtrees = all_subtrees([e.leaf_hash for e in stored])
    assert await stores[1].nodes(sorted(subtrees)) == [subtrees[k] for k in sorted(subtrees)]
    assert audit_db.count("nodes") == len(subtrees)


# --- queries ------------------------------------------------------------------------------------------------------
PRINCIPALS = ("alice", "bob", "carol")
METHODS = ("/t.v1.T/PlaceOrder", "/t.v1.T/CancelOrder")
OUTCOMES = (Outcome.OK, Outcome.DENIED_QUOTA, Outcome.DENIED_RISK, Outcome.FAILED)


def varied(n: int) -> Pending:
    return pending(
        n,
        principal=PRINCIPALS[n % 3],
        account_id=f"acct-{n % 2}",
        api_key_id=f"tgk_{n % 4}",
        method=METHODS[n % 2],
        outcome=OUTCOMES[n % 4],
        time_us=T0 + (n * 7919 % 50) * 1000,  # event times out of sequence order
    )


def matches(p: Pending, q: Query) -> bool:
    e = p.entry.event
    return (
        (not q.principal or e.principal == q.principal)
        and (not q.account_id or e.account_id == q.account_id)
        and (not q.api_key_id or e.api_key_id == q.api_key_id)
        and (not q.method or e.method == q.method)
        and (not q.outcome or e.outcome == q.outcome)
        and (q.start_us is None or e.time_us >= q.start_us)
        and (q.end_us is None or e.time_us < q.end_us)
    )


async def test_queries_by_each_column_and_time_with_paging(audit_store: AuditStore) -> None:
    items = [varied(n) for n in range(50)]
    await append_all(audit_store, items, 17)
    queries = [
        Query(),
        Query(principal="bob"),
        Query(account_id="acct-1"),
        Query(api_key_id="tgk_3"),
        Query(method=METHODS[1]),
        Query(outcome=Outcome.DENIED_RISK),
        Query(start_us=T0 + 10_000, end_us=T0 + 20_000),
        Query(start_us=T0 + 45_000),
        Query(end_us=T0 + 3_000),
        Query(principal="alice", outcome=Outcome.OK, start_us=T0 + 5_000, end_us=T0 + 45_000),
        Query(principal="nobody"),
        Query(principal="Alice"),  # exact, case-sensitive
    ]
    for query in queries:
        expected = [n for n, p in enumerate(items) if matches(p, query)]
        assert [e.sequence for e in await audit_store.query(query, -1, 1000)] == expected, query
        paged: list[StoredEntry] = []
        after = -1
        while page := await audit_store.query(query, after, 4):
            assert len(page) <= 4
            paged.extend(page)
            after = page[-1].sequence
        assert [e.sequence for e in paged] == expected, query
        assert [e.entry_bytes for e in paged] == [items[n].entry_bytes for n in expected]
        assert [e.leaf_hash for e in paged] == [items[n].leaf_hash for n in expected]
    assert await audit_store.query(Query(), 10, 0) == []
    assert [e.sequence for e in await audit_store.query(Query(), 47, 10)] == [48, 49]
    with pytest.raises(ValueError):
        await audit_store.query(Query(), -1, -1)


async def test_query_values_are_bound_not_spliced(audit_store: AuditStore) -> None:
    created(await audit_store.append([pending(0, principal="x' OR '1'='1"), pending(1)]))
    found = await audit_store.query(Query(principal="x' OR '1'='1"), -1, 10)
    assert [e.sequence for e in found] == [0]
    assert await audit_store.query(Query(method="' OR 1=1 --"), -1, 10) == []


# --- checkpoints --------------------------------------------------------------------------------------------------
async def test_checkpoints(audit_store: AuditStore) -> None:
    assert await audit_store.latest_checkpoint() is None
    assert await audit_store.checkpoints(-1, 10) == []
    cps = [Checkpoint(size, bytes([size]) * 32, f"note {size}", T0 + size) for size in (0, 3, 4, 9)]
    for cp in (cps[1], cps[0], cps[3], cps[2]):
        await audit_store.add_checkpoint(cp)
    assert await audit_store.latest_checkpoint() == cps[3]
    assert await audit_store.checkpoints(-1, 10) == cps
    assert await audit_store.checkpoints(0, 2) == cps[1:3]
    assert await audit_store.checkpoints(4, 10) == cps[3:]
    assert await audit_store.checkpoints(9, 10) == []
    await audit_store.add_checkpoint(dataclasses.replace(cps[1], note="signed again", time_us=T0 + 99))
    assert await audit_store.checkpoints(0, 1) == [cps[1]]  # the first one kept
    with pytest.raises(ValueError, match="another root"):
        await audit_store.add_checkpoint(dataclasses.replace(cps[1], root_hash=b"\x01" * 32))
    assert await audit_store.checkpoints(-1, 10) == cps


# --- retention: archive, then prune a prefix; the database refuses anything else --------------------------------
DAY_US = 86_400_000_000


def now_us() -> int:
    return time.time_ns() // 1000


def recorded(n: int, record_us: int) -> Pending:
    """`pending(n)` recorded at `record_us` (the database's trigger compares record times with its own clock)."""
    item = pending(n)
    entry = dataclasses.replace(item.entry, record_time_us=record_us)
    data = repr(entry).encode()
    return Pending(entry, data, tlog.leaf_hash(data), item.event_digest)


def archive_of(first: int, last: int) -> Archive:
    return Archive(first, last, hashlib.sha256(f"{first}-{last}".encode()).digest(), f"seg-{first}", now_us())


async def _old_and_recent(store: AuditStore, old: int, recent: int) -> list[Pending]:
    """`old` entries recorded two years ago, then `recent` recorded now."""
    items = [recorded(n, now_us() - 730 * DAY_US) for n in range(old)]
    items += [recorded(n, now_us()) for n in range(old, old + recent)]
    created(await store.append(items))
    return items


def _refused(audit_db: AuditDatabase, statement: str, params: tuple[object, ...] = ()) -> None:
    error = sqlite3.IntegrityError if audit_db.kind == "sqlite" else psycopg.errors.RaiseException
    with pytest.raises(error, match=r"append-only|prefix"):
        audit_db.execute(statement, params)


async def test_prune_removes_archived_expired_entries_and_keeps_the_tree(audit_store: AuditStore) -> None:
    items = await _old_and_recent(audit_store, 6, 4)
    assert await audit_store.retention_days() is None
    assert await audit_store.record_retention(365, now_us()) == 365
    assert await audit_store.record_retention(30, now_us()) == 365  # a shorter one changes nothing
    assert await audit_store.retention_days() == 365
    cutoff = now_us() - 365 * DAY_US
    assert [e.sequence for e in await audit_store.expired(cutoff, 10, 100)] == list(range(6))
    assert [e.sequence for e in await audit_store.expired(cutoff, 4, 100)] == list(range(4))  # below a size
    assert [e.sequence for e in await audit_store.expired(cutoff, 10, 2)] == [0, 1]
    first = archive_of(0, 5)
    await audit_store.prune(first)
    assert await audit_store.pruned() == 6
    assert await audit_store.archives() == [first]
    assert [e.sequence for e in await audit_store.entries(0, 100)] == [6, 7, 8, 9]
    assert [e.sequence for e in await audit_store.query(Query(), -1, 100)] == [6, 7, 8, 9]
    assert await audit_store.expired(cutoff, 10, 100) == []
    assert await audit_store.size() == 10
    leaves = [p.leaf_hash for p in items]
    assert await tree.root_at(10, audit_store.nodes) == tlog.root(leaves)  # nodes are never deleted
    for index in (0, 3, 7):
        proof = await tree.inclusion_proof(index, 10, audit_store.nodes)
        assert tlog.verify_inclusion(leaves[index], index, 10, proof, tlog.root(leaves))
    proof = await tree.consistency_proof(7, 10, audit_store.nodes)
    assert tlog.verify_consistency(7, 10, proof, tlog.root(leaves[:7]), tlog.root(leaves))
    # recent entries: refused by the database even when the code asks; nothing of the attempt is kept
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.RaiseException)):
        await audit_store.prune(archive_of(6, 9))
    assert await audit_store.archives() == [first]
    assert [e.sequence for e in await audit_store.entries(0, 100)] == [6, 7, 8, 9]
    # an archive that does not continue the prefix is refused
    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.RaiseException), match="prefix"):
        await audit_store.prune(archive_of(7, 7))


async def test_a_fully_pruned_log_keeps_its_size_and_continues(audit_db: AuditDatabase) -> None:
    store = await audit_db.open()
    items = await _old_and_recent(store, 5, 0)
    await store.record_retention(1, now_us())
    await store.prune(archive_of(0, 4))
    assert await store.entries(0, 100) == []
    assert await store.size() == 5
    await store.close()
    reopened = await audit_db.open()
    assert await reopened.size() == 5
    more = [recorded(n, now_us()) for n in range(5, 8)]
    assert created(await reopened.append(more)) == [5, 6, 7]
    assert await tree.root_at(8, reopened.nodes) == tlog.root([p.leaf_hash for p in items + more])


async def test_the_database_refuses_early_or_unarchived_deletes(
    audit_db: AuditDatabase, audit_store: AuditStore
) -> None:
    """As an attacker with the database would try it (the tables' owner, a direct connection)."""
    await _old_and_recent(audit_store, 6, 4)
    delete = "DELETE FROM {schema}.entries WHERE sequence = %s"
    insert_archive = "INSERT INTO {schema}.archives VALUES (%s, %s, %s, 'forged', 0)"
    digest = b"\x00" * 32
    _refused(audit_db, delete, (0,))  # no retention period recorded yet: nothing may go
    await audit_store.record_retention(3650, now_us())  # ten years: two-year-old entries are not expired
    audit_db.execute(insert_archive, (0, 7, digest))  # the attacker records an archive covering 0..7
    _refused(audit_db, delete, (0,))  # not older than the period
    _refused(audit_db, delete, (8,))  # recent, and not archived
    # a shorter period inserted by the attacker changes nothing: the longest one rules
    audit_db.execute("INSERT INTO {schema}.retention (period_days, recorded_at_us) VALUES (1, 0)")
    assert await audit_store.retention_days() == 3650
    _refused(audit_db, delete, (0,))
    _refused(audit_db, delete, (7,))
    _refused(audit_db, "DELETE FROM {schema}.entries")
    # the period cannot be shortened nor the archives rewritten
    _refused(audit_db, "UPDATE {schema}.retention SET period_days = 1")
    _refused(audit_db, "DELETE FROM {schema}.retention")
    _refused(audit_db, "UPDATE {schema}.archives SET last_sequence = 9")
    _refused(audit_db, "DELETE FROM {schema}.archives")
    _refused(audit_db, insert_archive, (9, 9, digest))  # not where the last one ended
    _refused(audit_db, "UPDATE {schema}.entries SET principal = 'mallory' WHERE sequence = 0")
    if audit_db.kind == "postgres":
        for table in ("entries", "archives", "retention"):
            _refused(audit_db, f"TRUNCATE {{schema}}.{table}")
    assert audit_db.count("entries") == 10
    assert [e.sequence for e in await audit_store.entries(0, 100)] == list(range(10))


async def test_archived_and_expired_entries_may_go_and_only_those(
    audit_db: AuditDatabase, audit_store: AuditStore
) -> None:
    await _old_and_recent(audit_store, 6, 4)
    await audit_store.record_retention(365, now_us())
    audit_db.execute("INSERT INTO {schema}.archives VALUES (0, 2, %s, 'f', 0)", (b"\x00" * 32,))
    audit_db.execute("DELETE FROM {schema}.entries WHERE sequence = 1")  # archived and two years old
    _refused(audit_db, "DELETE FROM {schema}.entries WHERE sequence = 3")  # old, not archived
    assert audit_db.count("entries") == 9


async def test_postgres_pruning_needs_the_pruner_role(pg_audit_db: AuditDatabase) -> None:
    """The writer role may read the archive and retention tables only; a service that also runs retention is a
    member of the pruner role, whose deletes the triggers still limit."""
    audit_db = pg_audit_db
    owner = await audit_db.open()
    await _old_and_recent(owner, 6, 4)
    login = audit_db.service_login
    service_dsn = PG_DSN.replace("user=postgres", f"user={login}")
    with psycopg.connect(PG_DSN, autocommit=True) as pg:
        pg.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(login)))
        pg.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(audit_db.writer), sql.Identifier(login)))
    writer = await audit_db.open(service_dsn)
    assert await writer.pruned() == 0 and await writer.retention_days() is None
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await writer.record_retention(365, now_us())
    await owner.record_retention(365, now_us())
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await writer.prune(archive_of(0, 5))
    with psycopg.connect(PG_DSN, autocommit=True) as pg:
        pg.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(audit_db.pruner), sql.Identifier(login)))
    await writer.prune(archive_of(0, 5))
    assert await writer.pruned() == 6
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        await writer.prune(archive_of(6, 9))  # recent: the trigger refuses the pruner as well
    with psycopg.connect(service_dsn, autocommit=True) as pg:
        schema = sql.Identifier(audit_db.schema)
        for statement in (
            "UPDATE {}.entries SET principal = 'x'",
            "TRUNCATE {}.entries",
            "DELETE FROM {}.nodes",
            "DELETE FROM {}.checkpoints",
            "ALTER TABLE {}.entries DISABLE TRIGGER USER",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                pg.execute(sql.SQL(statement).format(schema))
    assert audit_db.count("entries") == 4
