"""SQLite as every embedded-default store opens it: owner-only files, WAL, synchronous=FULL (a commit is on
disk before it returns), foreign keys, a busy timeout, and a schema brought up to date by its migrations (see
`tradeguard.storage.migrations`) in one transaction.

`SqliteWorker` is how a store uses it from asyncio: one thread owns the connection and runs every piece of work,
so the event loop never blocks on disk and the connection is only ever touched by the thread that opened it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tradeguard.batching import Outcome
from tradeguard.storage.migrations import Migration, pending

__all__ = ["BUSY_TIMEOUT_MS", "SqliteWorker", "connect", "in_transaction", "owner_only", "write_batch"]

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
_FILE_MODE = 0o600
_SIDE_FILES = ("", "-wal", "-shm", "-journal")
_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


def owner_only(path: Path) -> None:
    """Create the database file 0600 if absent; take group and world access from it and its side files."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    os.close(fd)
    for suffix in _SIDE_FILES:
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if side.stat().st_mode & 0o077:
                side.chmod(_FILE_MODE)


def in_transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run `work` in one BEGIN IMMEDIATE transaction: all of it is committed, or none of it.

    BEGIN IMMEDIATE takes the database's write lock first, so a read-check-write inside `work` (a compare-and-swap)
    cannot interleave with another connection's write."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _migrate(migrations: Sequence[Migration], where: str) -> Callable[[sqlite3.Connection], int]:
    def migrate(conn: sqlite3.Connection) -> int:
        conn.execute(_VERSION_TABLE)
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        todo = pending(migrations, None if row is None else row[0], where)
        for migration in todo:
            for step in migration.steps:
                if isinstance(step, str):
                    conn.execute(step.replace("{schema}.", ""))
                else:
                    step(conn)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (migration.version,))
        return len(todo)

    return migrate


def connect(
    path: Path, migrations: Sequence[Migration], *, pragmas: Sequence[str] = ()
) -> sqlite3.Connection:
    """Open (creating if needed) the database at `path`, migrated to the last of `migrations` in one transaction
    (a newer schema is refused with `SchemaTooNew`); `pragmas` are extra `PRAGMA …` statements."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # SQLite gives the -wal and -shm files the mode of the database file; the umask covers what it creates
    # before that (os.umask is process-wide: it is only ever narrowed here, for the span of the open).
    previous_umask = os.umask(0o077)
    try:
        owner_only(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise RuntimeError(f"could not switch {path} to WAL (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            for pragma in pragmas:
                conn.execute(pragma)
            in_transaction(conn, _migrate(migrations, str(path)))
            owner_only(path)
        except BaseException:
            conn.close()
            raise
    finally:
        os.umask(previous_umask)
    return conn


def write_batch(
    conn: sqlite3.Connection, works: Sequence[Callable[[sqlite3.Connection], object]]
) -> list[Outcome[object]]:
    """Group commit: all of `works` in one BEGIN IMMEDIATE transaction, each in its own SAVEPOINT; raises if the
    transaction did not commit (then nothing of it is stored).

    A write that raises is rolled back to its savepoint and reported in its `Outcome` while the others commit.
    A lone write needs no savepoint: its error rolls back the transaction and is raised, as for a failed COMMIT.
    If SQLite itself rolled the transaction back (I/O error, disk full), that error is raised for the batch."""
    if len(works) == 1:
        return [Outcome(value=in_transaction(conn, works[0]))]

    def run_all(conn: sqlite3.Connection) -> list[Outcome[object]]:
        outcomes: list[Outcome[object]] = []
        for work in works:
            conn.execute("SAVEPOINT write")
            try:
                value = work(conn)
            except Exception as error:
                if not conn.in_transaction:
                    raise
                conn.execute("ROLLBACK TO write")
                conn.execute("RELEASE write")
                outcomes.append(Outcome(error=error))
            else:
                conn.execute("RELEASE write")
                outcomes.append(Outcome(value=value))
        return outcomes

    return in_transaction(conn, run_all)


class SqliteWorker:
    """One SQLite connection owned by one thread; the event loop hands it work and awaits the result.

    Work runs one piece at a time, in the order it was handed over, so a `transaction` is never interleaved with
    anything else on this connection. Work that has started runs to its end on the thread even if the awaiting
    caller is cancelled: a transaction is committed or rolled back, never left half done. `close` waits for the
    work already handed over, then closes the connection; work handed over afterwards is refused.
    """

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._executor = executor
        self.path = path

    @classmethod
    async def open(
        cls,
        path: Path,
        migrations: Sequence[Migration],
        *,
        pragmas: Sequence[str] = (),
        name: str = "sqlite",
    ) -> SqliteWorker:
        """Open (creating and migrating, see `connect`) the database at `path` on a new thread named `name`."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        try:
            conn = await asyncio.get_running_loop().run_in_executor(
                executor, lambda: connect(path, migrations, pragmas=pragmas)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor, path)

    @property
    def closed(self) -> bool:
        return self._conn is None

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(conn)` on the worker thread, outside any transaction this worker opened (autocommit reads)."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"the database {self.path.name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, conn)

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work(conn)` in one BEGIN IMMEDIATE transaction on the worker thread: all of it or nothing."""
        return await self.run(lambda conn: in_transaction(conn, work))

    async def write_batch(
        self, works: Sequence[Callable[[sqlite3.Connection], object]]
    ) -> list[Outcome[object]]:
        """Group commit of `works` (see `write_batch`): the `run_batch` of a `tradeguard.batching.Batcher`."""
        return await self.run(lambda conn: write_batch(conn, works))

    async def close(self) -> None:
        """Close the connection after the work already handed over; idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        finally:
            self._executor.shutdown(wait=False)
