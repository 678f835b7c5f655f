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
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from services.audit import tree
from services.audit.model import Appended, Checkpoint, Pending, Query, StoredEntry
from services.audit.store import (
    ENTRY_COLUMNS,
    AppendPlan,
    EventIdConflict,
    Existing,
    check_page,
    entry_row,
    plan_append,
    query_conditions,
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
MIGRATIONS = (Migration(1, "entries, Merkle tree nodes, checkpoints; append-only triggers", _V1),)

# --- SQL -------------------------------------------------------------------------------------------------------
_E = ", ".join(ENTRY_COLUMNS)
SQL: Final = {
    "size": "SELECT coalesce(max(sequence) + 1, 0) FROM entries",
    "existing": "SELECT sequence, leaf_hash, event_digest FROM entries WHERE recorder = ? AND event_id = ?",
    "insert_entry": f"INSERT INTO entries ({_E}) VALUES ({', '.join('?' for _ in ENTRY_COLUMNS)})",  # noqa: S608
    "insert_node": "INSERT INTO nodes (level, idx, hash) VALUES (?, ?, ?)",
    "node": "SELECT hash FROM nodes WHERE level = ? AND idx = ?",
    "entries": "SELECT sequence, entry_bytes, leaf_hash FROM entries "
    "WHERE sequence >= ? AND sequence < ? ORDER BY sequence",
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
        worker = await SqliteWorker.open(path, MIGRATIONS, name="sqlite-audit")
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
            existing: dict[tuple[str, str], Existing] = {}
            for pending in items:
                key = (pending.entry.recorder, pending.entry.event.event_id)
                if key not in existing:
                    row = conn.execute(SQL["existing"], key).fetchone()
                    if row is not None:
                        existing[key] = Existing(int(row[0]), bytes(row[1]), bytes(row[2]))
            plan = plan_append(items, size, frontier, existing)
            conn.executemany(SQL["insert_entry"], [entry_row(seq, pending) for seq, pending in plan.rows])
            conn.executemany(SQL["insert_node"], [(n.level, n.index, n.hash) for n in plan.nodes])
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

    async def close(self) -> None:
        await self.worker.close()
