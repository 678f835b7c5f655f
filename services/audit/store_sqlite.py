"""SQLite audit store (the embedded default): the `AuditStore` contract (services/audit/store.py) on one file.

All database work runs on the kit's `SqliteWorker` (WAL, synchronous=FULL: a COMMIT is on disk before it
returns; owner-only files; the schema's migrations). An `append` is ONE BEGIN IMMEDIATE transaction: it reads the
log's size and looks up the batch's (recorder, event id)s, assigns the next sequence numbers, and inserts the
entries and the Merkle tree's new complete-subtree nodes (`tree.new_nodes`) together; its caller is answered
only after the COMMIT returned. `plan_append` (pure, shared with the PostgreSQL store) decides what a batch
writes.

The right edge of the tree (the nodes of `tree.subtree_keys(0, size)`, O(log n) of them: every left sibling an
append can need) is kept in memory, loaded on open and replaced only after a commit; an append that finds the
table's size differing from the cached one (another writer, or a commit whose caller was cancelled) reloads it
inside its transaction, so the nodes it writes are always right.

Tables (append-only): `entries` (sequence is the leaf index; the bytes, the leaf hash, the event digest, and the
query columns derived from the entry: principal, account, API key, method, outcome, event and record time),
`nodes` (level, index, hash), `checkpoints` (tree size, root, signed note, time). Triggers refuse every UPDATE
and DELETE, and an INSERT that would replace a row (`INSERT OR REPLACE` deletes without firing delete triggers),
with `RAISE(ABORT)`. They stop an application bug or a careless administrator, not an attacker who owns the file
(who may drop them): `tradeguard audit verify` still finds the first altered, missing or reordered entry.

Retention (migration 2): `archives` (one row per archived segment; append-only; a row must start where the last
ended) and `retention` (the periods in days ever configured; append-only). The DELETE trigger on `entries` then
allows the delete of an entry only when an `archives` row covers its sequence AND its record time is older than
the database's clock (`julianday('now')`, not the service's) minus the LONGEST period in `retention` — no
period recorded: no delete. A `prune` is one transaction: the `archives` row and the deletes, all or nothing.
"""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from services.audit import tree
from services.audit.model import Appended, Checkpoint, Pending, Query, StoredEntry
from services.audit.store import (
    ENTRY_COLUMNS,
    AppendPlan,
    Archive,
    EventIdConflict,
    Existing,
    archive_row,
    check_deleted,
    check_page,
    check_retention,
    entry_row,
    plan_append,
    query_conditions,
    recorded_before,
)
from tradeguard.storage.migrations import Migration
from tradeguard.storage.sqlite import SqliteWorker

__all__ = ["MIGRATIONS", "SqliteAuditStore"]


def _refusals(table: str, key: str) -> tuple[str, ...]:
    message = f"the audit log is append-only: {table} cannot be"
    return (
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{message} updated'); END",
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{message} deleted'); END",
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_replace BEFORE INSERT ON {table} "  # noqa: S608 (constants)
        f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {key}) "
        f"BEGIN SELECT RAISE(ABORT, '{message} replaced'); END",
    )


# Append-only: a released migration is never edited (see tradeguard.storage.migrations).
_V1 = (
    """CREATE TABLE IF NOT EXISTS entries (
        sequence INTEGER PRIMARY KEY CHECK (sequence >= 0),
        recorder TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_digest BLOB NOT NULL,
        entry_bytes BLOB NOT NULL,
        leaf_hash BLOB NOT NULL,
        principal TEXT NOT NULL,
        account_id TEXT NOT NULL,
        api_key_id TEXT NOT NULL,
        method TEXT NOT NULL,
        outcome INTEGER NOT NULL,
        event_time_us INTEGER NOT NULL,
        record_time_us INTEGER NOT NULL,
        UNIQUE (recorder, event_id)
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS entries_principal ON entries (principal, sequence)",
    "CREATE INDEX IF NOT EXISTS entries_account ON entries (account_id, sequence)",
    "CREATE INDEX IF NOT EXISTS entries_api_key ON entries (api_key_id, sequence)",
    "CREATE INDEX IF NOT EXISTS entries_method ON entries (method, sequence)",
    "CREATE INDEX IF NOT EXISTS entries_outcome ON entries (outcome, sequence)",
    "CREATE INDEX IF NOT EXISTS entries_event_time ON entries (event_time_us, sequence)",
    """CREATE TABLE IF NOT EXISTS nodes (
        level INTEGER NOT NULL CHECK (level >= 0),
        idx INTEGER NOT NULL CHECK (idx >= 0),
        hash BLOB NOT NULL,
        PRIMARY KEY (level, idx)
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        tree_size INTEGER PRIMARY KEY CHECK (tree_size >= 0),
        root_hash BLOB NOT NULL,
        note TEXT NOT NULL,
        time_us INTEGER NOT NULL
    ) STRICT""",
    *_refusals(
        "entries",
        "sequence = NEW.sequence OR (recorder = NEW.recorder AND event_id = NEW.event_id)",
    ),
    *_refusals("nodes", "level = NEW.level AND idx = NEW.idx"),
    *_refusals("checkpoints", "tree_size = NEW.tree_size"),
)
_V2 = (
    """CREATE TABLE IF NOT EXISTS archives (
        first_sequence INTEGER PRIMARY KEY CHECK (first_sequence >= 0),
        last_sequence INTEGER NOT NULL,
        sha256 BLOB NOT NULL CHECK (length(sha256) = 32),
        file_name TEXT NOT NULL,
        archived_at_us INTEGER NOT NULL,
        CHECK (last_sequence >= first_sequence)
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS retention (
        id INTEGER PRIMARY KEY,
        period_days INTEGER NOT NULL CHECK (period_days BETWEEN 1 AND 36500),
        recorded_at_us INTEGER NOT NULL
    ) STRICT""",
    *_refusals("archives", "first_sequence = NEW.first_sequence"),
    *_refusals("retention", "id = NEW.id"),
    "CREATE TRIGGER IF NOT EXISTS archives_prefix BEFORE INSERT ON archives "
    "WHEN NEW.first_sequence != (SELECT coalesce(max(last_sequence) + 1, 0) FROM archives) "
    "BEGIN SELECT RAISE(ABORT, 'the audit archive is a prefix: a segment starts where the last one ended'); END",
    "DROP TRIGGER IF EXISTS entries_no_delete",
    "CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries "
    "WHEN NOT coalesce(OLD.record_time_us < CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER) "
    "- (SELECT max(period_days) FROM retention) * 86400000000, 0) "
    "OR NOT EXISTS (SELECT 1 FROM archives WHERE first_sequence <= OLD.sequence "
    "AND last_sequence >= OLD.sequence) "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: entries cannot be deleted before they are "
    "archived and older than the retention period'); END",
)
MIGRATIONS = (
    Migration(1, "entries, Merkle tree nodes, checkpoints; append-only triggers", _V1),
    Migration(2, "retention: archives and retention tables; entries deleted only archived and expired", _V2),
)

# --- SQL -------------------------------------------------------------------------------------------------------
_E = ", ".join(ENTRY_COLUMNS)
SQL: Final = {
    "size": "SELECT coalesce(max(sequence) + 1, (SELECT max(last_sequence) + 1 FROM archives), 0) FROM entries",
    "pruned": "SELECT coalesce(max(last_sequence) + 1, 0) FROM archives",
    "expired": "SELECT sequence, entry_bytes, leaf_hash, record_time_us FROM entries WHERE sequence < ? "
    "ORDER BY sequence LIMIT ?",
    "insert_archive": "INSERT INTO archives (first_sequence, last_sequence, sha256, file_name, archived_at_us) "
    "VALUES (?, ?, ?, ?, ?)",
    "prune": "DELETE FROM entries WHERE sequence >= ? AND sequence <= ?",
    "archives": "SELECT first_sequence, last_sequence, sha256, file_name, archived_at_us FROM archives "
    "ORDER BY first_sequence",
    "retention": "SELECT max(period_days) FROM retention",
    "insert_retention": "INSERT INTO retention (period_days, recorded_at_us) VALUES (?, ?)",
    "node": "SELECT hash FROM nodes WHERE level = ? AND idx = ?",
    "entries": "SELECT sequence, entry_bytes, leaf_hash FROM entries "
    "WHERE sequence >= ? AND sequence < ? ORDER BY sequence",
    "rows": f"SELECT {_E} FROM entries WHERE sequence >= ? AND sequence < ? ORDER BY sequence",  # noqa: S608
    "get_checkpoint": "SELECT tree_size, root_hash, note, time_us FROM checkpoints WHERE tree_size = ?",
    "insert_checkpoint": "INSERT INTO checkpoints (tree_size, root_hash, note, time_us) VALUES (?, ?, ?, ?)",
    "latest_checkpoint": "SELECT tree_size, root_hash, note, time_us FROM checkpoints "
    "ORDER BY tree_size DESC LIMIT 1",
    "checkpoints": "SELECT tree_size, root_hash, note, time_us FROM checkpoints WHERE tree_size > ? "
    "ORDER BY tree_size LIMIT ?",
}


def _checkpoint(row: Sequence[Any]) -> Checkpoint:
    size, root, note, time_us = row
    return Checkpoint(tree_size=int(size), root_hash=bytes(root), note=str(note), time_us=int(time_us))


# --- the append's statements: a few rows per statement --------------------------------------------------------
# A statement of many rows costs SQLite far less per row than one statement per row (executemany): the append-only
# BEFORE INSERT triggers make every statement open its own statement journal, whatever it inserts (measured on a
# batch of 1000: the entries' INSERTs 15 → 8 µs per row, the nodes' 6.5 → 4.5 µs per entry). A statement's text
# depends on its row count, and parsing one costs as much as running it: rows go in statements of 2^k rows,
# k ≤ log2(_ROWS_MAX), so that at most a handful of texts exist, each parsed once and then taken from the
# connection's statement cache. Within the transaction all the same: a failing statement rolls all of it back.
# rows per INSERT (64 entries: 832 parameters; SQLite allows 32,766), event ids per lookup
_ROWS_MAX: Final = 64
_INSERT_ENTRIES: Final = (f"INSERT INTO entries ({_E}) VALUES ", len(ENTRY_COLUMNS))  # noqa: S608 (constant)
_INSERT_NODES: Final = ("INSERT INTO nodes (level, idx, hash) VALUES ", 3)


@functools.cache
def _values(head: str, width: int, count: int) -> str:
    """`head` followed by `count` rows of `width` parameters."""
    row = "(" + ", ".join("?" * width) + ")"
    return head + ", ".join([row] * count)


def _insert(conn: sqlite3.Connection, statement: tuple[str, int], rows: Sequence[Sequence[Any]]) -> None:
    """INSERT `rows` in statements of 2^k rows each (see above), in order."""
    head, width = statement
    start, total = 0, len(rows)
    while start < total:
        count = min(_ROWS_MAX, 1 << ((total - start).bit_length() - 1))
        chunk = rows[start : start + count]
        conn.execute(_values(head, width, count), list(itertools.chain.from_iterable(chunk)))
        start += count


@functools.cache
def _lookup(count: int) -> str:
    """The entries of one recorder under `count` event ids (the (recorder, event_id) index: one probe each)."""
    marks = ", ".join("?" * count)
    return (
        "SELECT event_id, sequence, leaf_hash, event_digest FROM entries "  # noqa: S608 (constant text)
        f"WHERE recorder = ? AND event_id IN ({marks})"
    )


def _existing(conn: sqlite3.Connection, items: Sequence[Pending]) -> dict[tuple[str, str], Existing]:
    """The entries already appended under the (recorder, event id)s of `items`: up to _ROWS_MAX ids per
    statement, a statement's list padded to a power of two by repeating its last id (the same answer)."""
    by_recorder: dict[str, dict[str, None]] = {}
    for pending in items:
        by_recorder.setdefault(pending.entry.recorder, {})[pending.entry.event.event_id] = None
    found: dict[tuple[str, str], Existing] = {}
    for recorder, unique in by_recorder.items():
        ids = list(unique)
        for start in range(0, len(ids), _ROWS_MAX):
            chunk = ids[start : start + _ROWS_MAX]
            width = 1 << (len(chunk) - 1).bit_length()
            chunk += chunk[-1:] * (width - len(chunk))
            for event_id, sequence, leaf, digest in conn.execute(_lookup(width), (recorder, *chunk)):
                found[(recorder, str(event_id))] = Existing(int(sequence), bytes(leaf), bytes(digest))
    return found


def _load_frontier(conn: sqlite3.Connection, size: int) -> dict[tuple[int, int], bytes]:
    frontier: dict[tuple[int, int], bytes] = {}
    for key in tree.subtree_keys(0, size):
        row = conn.execute(SQL["node"], key).fetchone()
        if row is None:
            raise RuntimeError(
                f"the audit log's node {key} is missing: the nodes table does not match the entries"
            )
        frontier[key] = bytes(row[0])
    return frontier


class SqliteAuditStore:
    """The `AuditStore` on one SQLite file (see the module)."""

    def __init__(self, worker: SqliteWorker, size: int, frontier: dict[tuple[int, int], bytes]) -> None:
        self.worker = worker
        self.path = worker.path
        self._size = size
        self._frontier = frontier

    @classmethod
    async def open(cls, path: Path) -> SqliteAuditStore:
        """Open (creating and migrating if needed) the store at `path` (owner-only files); loads the size and
        the tree's right edge."""
        # the append-only BEFORE INSERT trigger makes SQLite keep a statement journal per inserted row: in memory,
        # not a temporary file (measured: the entries insert's CPU per event halved; durability is the WAL's)
        worker = await SqliteWorker.open(
            path, MIGRATIONS, name="sqlite-audit", pragmas=("PRAGMA temp_store = MEMORY",)
        )
        try:

            def load(conn: sqlite3.Connection) -> tuple[int, dict[tuple[int, int], bytes]]:
                size = int(conn.execute(SQL["size"]).fetchone()[0])
                return size, _load_frontier(conn, size)

            size, frontier = await worker.transaction(load)
        except BaseException:
            await worker.close()
            raise
        return cls(worker, size, frontier)

    async def append(self, batch: Sequence[Pending]) -> list[Appended | EventIdConflict]:
        items = list(batch)
        cached_size, cached_frontier = self._size, self._frontier

        def work(conn: sqlite3.Connection) -> AppendPlan:
            size = int(conn.execute(SQL["size"]).fetchone()[0])
            frontier = cached_frontier if size == cached_size else _load_frontier(conn, size)
            plan = plan_append(items, size, frontier, _existing(conn, items))
            _insert(conn, _INSERT_ENTRIES, [entry_row(sequence, pending) for sequence, pending in plan.rows])
            _insert(conn, _INSERT_NODES, plan.nodes)
            return plan

        plan = await self.worker.transaction(work)
        self._size, self._frontier = plan.size, plan.frontier
        return plan.results

    async def size(self) -> int:
        return int((await self.worker.run(lambda conn: conn.execute(SQL["size"]).fetchone()))[0])

    async def nodes(self, keys: Sequence[tuple[int, int]]) -> list[bytes]:
        wanted = [(int(level), int(index)) for level, index in keys]

        def work(conn: sqlite3.Connection) -> list[bytes]:
            out: list[bytes] = []
            for key in wanted:
                row = conn.execute(SQL["node"], key).fetchone()
                if row is None:
                    raise KeyError(key)
                out.append(bytes(row[0]))
            return out

        return await self.worker.run(work)

    async def entries(self, start: int, count: int) -> list[StoredEntry]:
        if start < 0 or count < 0:
            raise ValueError(f"invalid range: start {start}, count {count}")
        rows = await self.worker.run(
            lambda conn: conn.execute(SQL["entries"], (start, start + count)).fetchall()
        )
        return [StoredEntry(int(seq), bytes(data), bytes(leaf)) for seq, data, leaf in rows]

    async def rows(self, start: int, count: int) -> list[tuple[Any, ...]]:
        if start < 0 or count < 0:
            raise ValueError(f"invalid range: start {start}, count {count}")
        found = await self.worker.run(
            lambda conn: conn.execute(SQL["rows"], (start, start + count)).fetchall()
        )
        return [tuple(row) for row in found]

    async def query(self, query: Query, after: int, limit: int) -> list[StoredEntry]:
        check_page(after, limit)
        conditions, params = query_conditions(query, "?")
        where = " AND ".join(["sequence > ?", *conditions])
        text = f"SELECT sequence, entry_bytes, leaf_hash FROM entries WHERE {where} ORDER BY sequence LIMIT ?"  # noqa: S608
        values = (after, *params, limit)
        rows = await self.worker.run(lambda conn: conn.execute(text, values).fetchall())
        return [StoredEntry(int(seq), bytes(data), bytes(leaf)) for seq, data, leaf in rows]

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint; one already stored for its size is kept (the same root: idempotent; another root:
        ValueError, a fork, nothing written)."""
        row = (checkpoint.tree_size, checkpoint.root_hash, checkpoint.note, checkpoint.time_us)

        def work(conn: sqlite3.Connection) -> None:
            found = conn.execute(SQL["get_checkpoint"], (checkpoint.tree_size,)).fetchone()
            if found is None:
                conn.execute(SQL["insert_checkpoint"], row)
            elif bytes(found[1]) != checkpoint.root_hash:
                raise ValueError(f"a checkpoint for size {checkpoint.tree_size} with another root is stored")

        await self.worker.transaction(work)

    async def latest_checkpoint(self) -> Checkpoint | None:
        row = await self.worker.run(lambda conn: conn.execute(SQL["latest_checkpoint"]).fetchone())
        return None if row is None else _checkpoint(row)

    async def checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]:
        check_page(after_size, limit)
        rows = await self.worker.run(
            lambda conn: conn.execute(SQL["checkpoints"], (after_size, limit)).fetchall()
        )
        return [_checkpoint(row) for row in rows]

    # --- retention -----------------------------------------------------------------------------------------

    async def pruned(self) -> int:
        return int((await self.worker.run(lambda conn: conn.execute(SQL["pruned"]).fetchone()))[0])

    async def expired(self, before_us: int, below: int, limit: int) -> list[StoredEntry]:
        check_page(0, limit)
        rows = await self.worker.run(lambda conn: conn.execute(SQL["expired"], (below, limit)).fetchall())
        return recorded_before(rows, before_us)

    async def prune(self, archive: Archive) -> None:
        row = archive_row(archive)
        span = (archive.first_sequence, archive.last_sequence)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(SQL["insert_archive"], row)
            deleted = conn.execute(SQL["prune"], span).rowcount
            check_deleted(deleted, archive)

        await self.worker.transaction(work)

    async def archives(self) -> list[Archive]:
        rows = await self.worker.run(lambda conn: conn.execute(SQL["archives"]).fetchall())
        return [Archive(int(a), int(b), bytes(h), str(f), int(t)) for a, b, h, f, t in rows]

    async def retention_days(self) -> int | None:
        row = await self.worker.run(lambda conn: conn.execute(SQL["retention"]).fetchone())
        return None if row[0] is None else int(row[0])

    async def record_retention(self, days: int, at_us: int) -> int:
        check_retention(days)

        def work(conn: sqlite3.Connection) -> int:
            found = conn.execute(SQL["retention"]).fetchone()[0]
            if found is not None and int(found) >= days:
                return int(found)
            conn.execute(SQL["insert_retention"], (days, at_us))
            return days

        return await self.worker.transaction(work)

    async def close(self) -> None:
        await self.worker.close()
