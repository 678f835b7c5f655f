"""PostgreSQL audit store: the `AuditStore` contract (services/audit/store.py) in a schema of its own ("tg_audit").

An `append` reads the log's size and the entries already appended under the batch's (recorder, event id)s (one
statement), then writes the entries and the Merkle tree's new complete-subtree nodes (`tree.new_nodes`) in ONE
transaction, committed before it returns: a small batch as one statement (its own transaction: the pool's
connections are autocommit) inserting both with `unnest` (a data-modifying WITH), two round trips in all; a batch
of `COPY_FROM` entries or more with COPY (psycopg's array parameters cost more than the database's work at that
size) between BEGIN and COMMIT. What a batch writes is decided by `store_sqlite.plan_append` (pure, one rule for
both stores). The tree's right edge is cached as in the SQLite store: loaded on open, replaced after a commit,
reloaded when the table's size differs from the cached one. A second writer on the same schema (never the
service's way: it has one batcher) cannot corrupt the log: the sequence and node primary keys and the (recorder,
event id) key make a write that raced another fail as a whole, and the next append starts from the table again.

**Append-only, twice.** (1) Triggers: every UPDATE, DELETE and TRUNCATE of `entries`, `nodes` and `checkpoints`
raises (`refuse_change`), whoever runs it, the tables' owner included (who would have to drop or disable the
triggers first: DDL that a log monitor sees). (2) Privileges: the migration creates the NOLOGIN role
`<schema>_writer` (`writer_role`) with USAGE on the schema, SELECT and INSERT on the three tables and SELECT on
`schema_version`, nothing else: it cannot UPDATE, DELETE, TRUNCATE, ALTER or DROP, so a stolen service credential
cannot disable the triggers either. The role is created when the migrating user may create roles (superuser or
CREATEROLE); otherwise an administrator creates it (`CREATE ROLE tg_audit_writer NOLOGIN`) before the first
migration, which then grants to it.

**Production** uses two roles: the OWNER (a deploy job or the DBA) runs the migrations once,
`PostgresAuditStore.open(owner_dsn)`, and owns the tables; the SERVICE connects as a LOGIN role that is only a
member of the writer role (`CREATE ROLE tg_audit_service LOGIN PASSWORD …; GRANT tg_audit_writer TO
tg_audit_service`): its `open` finds the schema at the last version and changes nothing (a schema left behind
fails its migration for want of privileges, or with `migrate=False` is refused before any attempt). A development install connects as one user that owns everything: the triggers still refuse changes.
Whatever gets past both, `tradeguard audit verify` finds from the Merkle tree.

**Retention** (migration 2): the append-only tables `archives` (one row per archived segment; a row must start
where the last one ended: `check_archive`) and `retention` (every period in days configured; append-only, so the
LONGEST one rules: inserting a shorter one changes nothing). DELETE of `entries` is then checked row by row
(`check_prune`): allowed only when an `archives` row covers the sequence AND the entry's record time is older
than the database's clock (`clock_timestamp()`, not the service's) minus the longest period recorded; none
recorded: refused. UPDATE and TRUNCATE stay refused always; `nodes` and `checkpoints` are never deleted.
Privileges stay narrow: the writer role gets SELECT on the two new tables only (it still cannot DELETE, nor
record an archive or a period); pruning needs the NOLOGIN role `<schema>_pruner` (`pruner_role`: SELECT on the
tables, DELETE on `entries` — within the trigger's limits —, INSERT on `archives` and `retention`). A service
that runs the retention task (services/audit/retention.py) logs in as a member of both (`GRANT tg_audit_pruner
TO tg_audit_service`); without it the task reports the missing privilege at each run and deletes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from services.audit import tree
from services.audit.model import Appended, Checkpoint, Pending, Query, StoredEntry
from services.audit.store import (
    ENTRY_COLUMNS,
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
from tradeguard.storage.migrations import Migration, Step, latest_version, pending
from tradeguard.storage.postgres import Conn, Pool, check_schema_name
from tradeguard.storage.postgres import migrate as migrate_schema

__all__ = ["COPY_FROM", "DEFAULT_SCHEMA", "MIGRATIONS", "PostgresAuditStore", "pruner_role", "writer_role"]

DEFAULT_SCHEMA = "tg_audit"
COPY_FROM: Final = 16  # entries in a batch from which it is written with COPY
_TABLES: Final = ("entries", "nodes", "checkpoints")


def writer_role(schema: str) -> str:
    """The NOLOGIN role that may only SELECT and INSERT the audit tables of `schema`."""
    role = f"{check_schema_name(schema)}_writer"
    if len(role) > 63:
        raise ValueError(f"schema name {schema!r} too long for its writer role name")
    return role


def pruner_role(schema: str) -> str:
    """The NOLOGIN role that may archive and prune (within the triggers' limits) the audit log of `schema`."""
    role = f"{check_schema_name(schema)}_pruner"
    if len(role) > 63:
        raise ValueError(f"schema name {schema!r} too long for its pruner role name")
    return role


async def _may_create_roles(conn: Conn) -> bool:
    cur = await conn.execute("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
    row = await cur.fetchone()
    return row is not None and bool(row[0])


async def _role_exists(conn: Conn, role: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    return await cur.fetchone() is not None


async def _grant_retention(conn: Conn, schema: str) -> None:
    """Migration 2's privileges (see the module): the writer may read the new tables; the pruner role (created
    when this user may) may delete entries and record archives and periods."""
    archives, retention = sql.Identifier(schema, "archives"), sql.Identifier(schema, "retention")
    writer = writer_role(schema)
    if await _role_exists(conn, writer):
        await conn.execute(
            sql.SQL("GRANT SELECT ON {}, {} TO {}").format(archives, retention, sql.Identifier(writer))
        )
    pruner = pruner_role(schema)
    if not await _role_exists(conn, pruner):
        if not await _may_create_roles(conn):
            return  # an administrator creates it (CREATE ROLE tg_audit_pruner NOLOGIN) and migrates again
        await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(pruner)))
    ident = sql.Identifier(pruner)
    entries = sql.Identifier(schema, "entries")
    version = sql.Identifier(schema, "schema_version")
    nodes, checkpoints = sql.Identifier(schema, "nodes"), sql.Identifier(schema, "checkpoints")
    await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), ident))
    await conn.execute(
        sql.SQL("GRANT SELECT ON {}, {}, {}, {}, {}, {} TO {}").format(
            entries, nodes, checkpoints, archives, retention, version, ident
        )
    )
    await conn.execute(sql.SQL("GRANT DELETE ON {} TO {}").format(entries, ident))
    await conn.execute(sql.SQL("GRANT INSERT ON {}, {} TO {}").format(archives, retention, ident))


async def _grant_writer(conn: Conn, schema: str) -> None:
    """Create (when this user may) the writer role and grant it SELECT and INSERT only (see the module)."""
    role = writer_role(schema)
    cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    if await cur.fetchone() is None:
        cur = await conn.execute(
            "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        )
        row = await cur.fetchone()
        if row is None or not row[0]:
            return  # no writer role: the triggers alone refuse changes (an administrator creates it: module)
        await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
    ident = sql.Identifier(role)
    await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), ident))
    tables = sql.SQL(", ").join(sql.Identifier(schema, table) for table in _TABLES)
    await conn.execute(sql.SQL("GRANT SELECT, INSERT ON {} TO {}").format(tables, ident))
    version = sql.Identifier(schema, "schema_version")
    await conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(version, ident))


def _triggers(table: str) -> tuple[str, ...]:
    return (
        f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {{schema}}.{table} "
        "FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change()",
        f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {{schema}}.{table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION {schema}.refuse_change()",
    )


# Append-only: a released migration is never edited (see tradeguard.storage.migrations).
_V1: tuple[Step, ...] = (
    """CREATE TABLE {schema}.entries (
        sequence bigint PRIMARY KEY CHECK (sequence >= 0),
        recorder text COLLATE "C" NOT NULL,
        event_id text COLLATE "C" NOT NULL,
        event_digest bytea NOT NULL,
        entry_bytes bytea NOT NULL,
        leaf_hash bytea NOT NULL,
        principal text COLLATE "C" NOT NULL,
        account_id text COLLATE "C" NOT NULL,
        api_key_id text COLLATE "C" NOT NULL,
        method text COLLATE "C" NOT NULL,
        outcome smallint NOT NULL,
        event_time_us bigint NOT NULL,
        record_time_us bigint NOT NULL,
        UNIQUE (recorder, event_id)
    )""",
    "CREATE INDEX entries_principal ON {schema}.entries (principal, sequence)",
    "CREATE INDEX entries_account ON {schema}.entries (account_id, sequence)",
    "CREATE INDEX entries_api_key ON {schema}.entries (api_key_id, sequence)",
    "CREATE INDEX entries_method ON {schema}.entries (method, sequence)",
    "CREATE INDEX entries_outcome ON {schema}.entries (outcome, sequence)",
    "CREATE INDEX entries_event_time ON {schema}.entries (event_time_us, sequence)",
    """CREATE TABLE {schema}.nodes (
        level integer NOT NULL CHECK (level >= 0),
        idx bigint NOT NULL CHECK (idx >= 0),
        hash bytea NOT NULL,
        PRIMARY KEY (level, idx)
    )""",
    """CREATE TABLE {schema}.checkpoints (
        tree_size bigint PRIMARY KEY CHECK (tree_size >= 0),
        root_hash bytea NOT NULL,
        note text NOT NULL,
        time_us bigint NOT NULL
    )""",
    """CREATE FUNCTION {schema}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit log is append-only: % of %.% refused', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END
    $$""",
    *(step for table in _TABLES for step in _triggers(table)),
    _grant_writer,
)
_V2: tuple[Step, ...] = (
    """CREATE TABLE {schema}.archives (
        first_sequence bigint PRIMARY KEY CHECK (first_sequence >= 0),
        last_sequence bigint NOT NULL,
        sha256 bytea NOT NULL CHECK (length(sha256) = 32),
        file_name text NOT NULL,
        archived_at_us bigint NOT NULL,
        CHECK (last_sequence >= first_sequence)
    )""",
    """CREATE TABLE {schema}.retention (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        period_days integer NOT NULL CHECK (period_days BETWEEN 1 AND 36500),
        recorded_at_us bigint NOT NULL
    )""",
    *_triggers("archives"),
    *_triggers("retention"),
    """CREATE FUNCTION {schema}.check_archive() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.first_sequence <> (SELECT coalesce(max(last_sequence) + 1, 0) FROM {schema}.archives) THEN
            RAISE EXCEPTION 'the audit archive is a prefix: a segment starts where the last one ended';
        END IF;
        RETURN NEW;
    END
    $$""",
    "CREATE TRIGGER archives_prefix BEFORE INSERT ON {schema}.archives "
    "FOR EACH ROW EXECUTE FUNCTION {schema}.check_archive()",
    """CREATE FUNCTION {schema}.check_prune() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        days bigint := (SELECT max(period_days) FROM {schema}.retention);
    BEGIN
        IF days IS NULL
            OR OLD.record_time_us >= (extract(epoch FROM clock_timestamp()) * 1000000)::bigint - days * 86400000000
            OR NOT EXISTS (
                SELECT 1 FROM (
                    SELECT last_sequence FROM {schema}.archives WHERE first_sequence <= OLD.sequence
                    ORDER BY first_sequence DESC LIMIT 1
                ) AS a WHERE a.last_sequence >= OLD.sequence
            )
        THEN
            RAISE EXCEPTION 'the audit log is append-only: entry % cannot be deleted before it is archived '
                'and older than the retention period', OLD.sequence;
        END IF;
        RETURN OLD;
    END
    $$""",
    "DROP TRIGGER entries_append_only ON {schema}.entries",
    "CREATE TRIGGER entries_append_only BEFORE UPDATE ON {schema}.entries "
    "FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_change()",
    "CREATE TRIGGER entries_prune_only BEFORE DELETE ON {schema}.entries "
    "FOR EACH ROW EXECUTE FUNCTION {schema}.check_prune()",
    _grant_retention,
)
MIGRATIONS = (
    Migration(1, "entries, Merkle tree nodes, checkpoints; append-only triggers; writer role", _V1),
    Migration(2, "retention: archives and retention tables; entries deleted only archived and expired", _V2),
)

_ENTRY_TYPES: Final = (
    "bigint",
    "text",
    "text",
    "bytea",
    "bytea",
    "bytea",
    "text",
    "text",
    "text",
    "text",
    "smallint",
    "bigint",
    "bigint",
)


def statements(schema: str) -> dict[str, sql.Composed]:
    """The store's SQL, with its tables in `schema`."""
    fmt = {
        "entries": sql.Identifier(schema, "entries"),
        "nodes": sql.Identifier(schema, "nodes"),
        "checkpoints": sql.Identifier(schema, "checkpoints"),
        "archives": sql.Identifier(schema, "archives"),
        "retention": sql.Identifier(schema, "retention"),
        "e": sql.SQL(", ").join(sql.Identifier(c) for c in ENTRY_COLUMNS),
        "e_arrays": sql.SQL(", ").join(sql.SQL(f"%s::{t}[]") for t in _ENTRY_TYPES),  # constant type names
        "cp": sql.SQL("tree_size, root_hash, note, time_us"),
    }
    q = {
        "size": "SELECT coalesce(max(sequence) + 1, (SELECT max(last_sequence) + 1 FROM {archives}), 0) "
        "FROM {entries}",
        "pruned": "SELECT coalesce(max(last_sequence) + 1, 0) FROM {archives}",
        "expired": "SELECT sequence, entry_bytes, leaf_hash, record_time_us FROM {entries} WHERE sequence < %s "
        "ORDER BY sequence LIMIT %s",
        "insert_archive": "INSERT INTO {archives} (first_sequence, last_sequence, sha256, file_name, "
        "archived_at_us) VALUES (%s, %s, %s, %s, %s)",
        "prune": "DELETE FROM {entries} WHERE sequence >= %s AND sequence <= %s",
        "archives": "SELECT first_sequence, last_sequence, sha256, file_name, archived_at_us FROM {archives} "
        "ORDER BY first_sequence",
        "retention": "SELECT max(period_days) FROM {retention}",
        "insert_retention": "INSERT INTO {retention} (period_days, recorded_at_us) VALUES (%s, %s)",
        # the size, and the batch's entries already appended (NULLs for none): one row at least
        "existing": "SELECT s.size, e.recorder, e.event_id, e.sequence, e.leaf_hash, e.event_digest "
        "FROM (SELECT coalesce(max(sequence) + 1, (SELECT max(last_sequence) + 1 FROM {archives}), 0) AS size "
        "FROM {entries}) AS s LEFT JOIN ("
        "{entries} e JOIN unnest(%s::text[], %s::text[]) AS b (recorder, event_id) "
        'ON e.recorder = b.recorder COLLATE "C" AND e.event_id = b.event_id COLLATE "C") ON true',
        "insert": "WITH appended AS (INSERT INTO {entries} ({e}) SELECT * FROM unnest({e_arrays})) "
        "INSERT INTO {nodes} (level, idx, hash) SELECT * FROM unnest(%s::integer[], %s::bigint[], %s::bytea[])",
        "copy_entries": "COPY {entries} ({e}) FROM STDIN",
        "copy_nodes": "COPY {nodes} (level, idx, hash) FROM STDIN",
        "nodes": "SELECT k.ord, n.hash FROM unnest(%s::integer[], %s::bigint[]) WITH ORDINALITY AS k (level, idx, ord) "
        "JOIN {nodes} n ON n.level = k.level AND n.idx = k.idx",
        "entries": "SELECT sequence, entry_bytes, leaf_hash FROM {entries} "
        "WHERE sequence >= %s AND sequence < %s ORDER BY sequence",
        "rows": "SELECT {e} FROM {entries} WHERE sequence >= %s AND sequence < %s ORDER BY sequence",
        "insert_checkpoint": "INSERT INTO {checkpoints} (tree_size, root_hash, note, time_us) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (tree_size) DO NOTHING RETURNING tree_size",
        "get_checkpoint": "SELECT {cp} FROM {checkpoints} WHERE tree_size = %s",
        "latest_checkpoint": "SELECT {cp} FROM {checkpoints} ORDER BY tree_size DESC LIMIT 1",
        "checkpoints": "SELECT {cp} FROM {checkpoints} WHERE tree_size > %s ORDER BY tree_size LIMIT %s",
    }
    return {name: sql.SQL(text).format(**fmt) for name, text in q.items()}


def _checkpoint(row: Sequence[Any]) -> Checkpoint:
    size, root, note, time_us = row
    return Checkpoint(tree_size=size, root_hash=bytes(root), note=note, time_us=time_us)


def _stored(rows: Sequence[Sequence[Any]]) -> list[StoredEntry]:
    return [StoredEntry(seq, bytes(data), bytes(leaf)) for seq, data, leaf in rows]


class PostgresAuditStore:
    """The `AuditStore` in one PostgreSQL schema (see the module)."""

    def __init__(self, pool: Pool, schema: str, size: int, frontier: dict[tuple[int, int], bytes]) -> None:
        self._pool = pool
        self.schema = schema
        self.sql = statements(schema)
        self._size = size
        self._frontier = frontier

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        min_size: int = 1,
        max_size: int = 10,
        migrate: bool = True,
    ) -> PostgresAuditStore:
        """Open the pool, bring `schema` to the store's last migration if it is behind (created if absent: as its
        owner; `migrate=False` refuses instead), and load the size and the tree's right edge. A schema already at
        the last version is only read (`schema_version`), so the writer role opens it with no DDL at all."""
        check_schema_name(schema)
        pool: Pool = AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True}
        )
        await pool.open(wait=True)
        try:
            store = cls(pool, schema, 0, {})
            async with pool.connection() as conn:
                found = await store._version(conn)
                if pending(MIGRATIONS, found, f"schema {schema}"):  # SchemaTooNew if newer than this code
                    if not migrate:
                        raise RuntimeError(
                            f"schema {schema} is at version {found or 0}, the audit store needs "
                            f"{latest_version(MIGRATIONS)}: run the migration as the schema's owner"
                        )
                    await migrate_schema(conn, schema, MIGRATIONS)
                store._size = await store._read_size(conn)
                store._frontier = await store._load_frontier(conn, store._size)
        except BaseException:
            await pool.close()
            raise
        return store

    async def _version(self, conn: Conn) -> int | None:
        """The schema's version; None when it has none yet."""
        table = sql.Identifier(self.schema, "schema_version")
        try:
            cur = await conn.execute(sql.SQL("SELECT max(version) FROM {}").format(table))
        except psycopg.errors.UndefinedTable:
            return None
        row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    async def _read_size(self, conn: Conn) -> int:
        cur = await conn.execute(self.sql["size"])
        row = await cur.fetchone()
        return 0 if row is None else int(row[0])

    async def _read_nodes(self, conn: Conn, keys: Sequence[tuple[int, int]]) -> list[bytes]:
        if not keys:
            return []
        levels, indexes = [int(k[0]) for k in keys], [int(k[1]) for k in keys]
        cur = await conn.execute(self.sql["nodes"], (levels, indexes))
        found = {int(ord_): bytes(value) for ord_, value in await cur.fetchall()}
        missing = [key for position, key in enumerate(keys, start=1) if position not in found]
        if missing:
            raise KeyError(missing[0])
        return [found[position] for position in range(1, len(keys) + 1)]

    async def _load_frontier(self, conn: Conn, size: int) -> dict[tuple[int, int], bytes]:
        keys = tree.subtree_keys(0, size)
        try:
            values = await self._read_nodes(conn, keys)
        except KeyError as missing:
            raise RuntimeError(
                f"the audit log's node {missing.args[0]} is missing: the nodes table does not match the entries"
            ) from None
        return dict(zip(keys, values, strict=True))

    async def append(self, batch: Sequence[Pending]) -> list[Appended | EventIdConflict]:
        items = list(batch)
        if not items:
            return []
        recorders = [p.entry.recorder for p in items]
        event_ids = [p.entry.event.event_id for p in items]
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["existing"], (recorders, event_ids))
            rows = await cur.fetchall()
            size = int(rows[0][0])
            existing = {
                (recorder, event_id): Existing(sequence, bytes(leaf), bytes(digest))
                for _, recorder, event_id, sequence, leaf, digest in rows
                if recorder is not None
            }
            frontier = self._frontier if size == self._size else await self._load_frontier(conn, size)
            plan = plan_append(items, size, frontier, existing)
            if len(plan.rows) >= COPY_FROM:
                async with conn.transaction():
                    async with conn.cursor() as cur, cur.copy(self.sql["copy_entries"]) as copy:
                        for sequence, item in plan.rows:
                            await copy.write_row(entry_row(sequence, item))
                    async with conn.cursor() as cur, cur.copy(self.sql["copy_nodes"]) as copy:
                        for node in plan.nodes:
                            await copy.write_row(node)
            elif plan.rows:
                columns = [
                    list(column) for column in zip(*(entry_row(q, p) for q, p in plan.rows), strict=True)
                ]
                nodes = tuple(list(column) for column in zip(*plan.nodes, strict=True))
                await conn.execute(self.sql["insert"], (*columns, *nodes))  # one statement: one transaction
        self._size, self._frontier = plan.size, plan.frontier
        return plan.results

    async def size(self) -> int:
        async with self._pool.connection() as conn:
            return await self._read_size(conn)

    async def nodes(self, keys: Sequence[tuple[int, int]]) -> list[bytes]:
        async with self._pool.connection() as conn:
            return await self._read_nodes(conn, list(keys))

    async def entries(self, start: int, count: int) -> list[StoredEntry]:
        if start < 0 or count < 0:
            raise ValueError(f"invalid range: start {start}, count {count}")
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["entries"], (start, start + count))
            return _stored(await cur.fetchall())

    async def rows(self, start: int, count: int) -> list[tuple[Any, ...]]:
        if start < 0 or count < 0:
            raise ValueError(f"invalid range: start {start}, count {count}")
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["rows"], (start, start + count))
            return [tuple(row) for row in await cur.fetchall()]

    async def query(self, query: Query, after: int, limit: int) -> list[StoredEntry]:
        check_page(after, limit)
        conditions, params = query_conditions(query, "%s")
        where = sql.SQL(" AND ".join(["sequence > %s", *conditions]))  # constant text, values bound
        text = sql.SQL(
            "SELECT sequence, entry_bytes, leaf_hash FROM {} WHERE {} ORDER BY sequence LIMIT %s"
        ).format(sql.Identifier(self.schema, "entries"), where)
        async with self._pool.connection() as conn:
            cur = await conn.execute(text, (after, *params, limit))
            return _stored(await cur.fetchall())

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store a checkpoint; one already stored for its size is kept (the same root: idempotent; another root:
        ValueError, a fork, nothing written)."""
        row = (checkpoint.tree_size, checkpoint.root_hash, checkpoint.note, checkpoint.time_us)
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["insert_checkpoint"], row)
            if await cur.fetchone() is not None:
                return
            cur = await conn.execute(self.sql["get_checkpoint"], (checkpoint.tree_size,))
            found = await cur.fetchone()
        if found is None or bytes(found[1]) != checkpoint.root_hash:
            raise ValueError(f"a checkpoint for size {checkpoint.tree_size} with another root is stored")

    async def latest_checkpoint(self) -> Checkpoint | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["latest_checkpoint"])
            row = await cur.fetchone()
        return None if row is None else _checkpoint(row)

    async def checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]:
        check_page(after_size, limit)
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["checkpoints"], (after_size, limit))
            return [_checkpoint(row) for row in await cur.fetchall()]

    # --- retention -----------------------------------------------------------------------------------------

    async def _one(self, name: str, params: Sequence[Any] = ()) -> Any:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql[name], tuple(params) or None)
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def pruned(self) -> int:
        return int(await self._one("pruned"))

    async def expired(self, before_us: int, below: int, limit: int) -> list[StoredEntry]:
        check_page(0, limit)
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["expired"], (below, limit))
            return recorded_before(await cur.fetchall(), before_us)

    async def prune(self, archive: Archive) -> None:
        row = archive_row(archive)
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(self.sql["insert_archive"], row)
            cur = await conn.execute(self.sql["prune"], (archive.first_sequence, archive.last_sequence))
            check_deleted(cur.rowcount, archive)  # raised inside the transaction: rolled back

    async def archives(self) -> list[Archive]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["archives"])
            rows = await cur.fetchall()
        return [Archive(a, b, bytes(h), f, t) for a, b, h, f, t in rows]

    async def retention_days(self) -> int | None:
        found = await self._one("retention")
        return None if found is None else int(found)

    async def record_retention(self, days: int, at_us: int) -> int:
        """(Two racing both insert a longer period at most: the maximum rules either way.)"""
        check_retention(days)
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(self.sql["retention"])
            row = await cur.fetchone()
            if row is not None and row[0] is not None and int(row[0]) >= days:
                return int(row[0])
            await conn.execute(self.sql["insert_retention"], (days, at_us))
            return days

    async def close(self) -> None:
        """Close the pool; later calls are refused (psycopg_pool.PoolClosed)."""
        await self._pool.close()
