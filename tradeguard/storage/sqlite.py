"""SQLite as every embedded-default store opens it: owner-only files, WAL, synchronous=FULL (a commit is on
disk before it returns), foreign keys, a busy timeout, and a versioned schema created in one transaction."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
_FILE_MODE = 0o600
_SIDE_FILES = ("", "-wal", "-shm", "-journal")


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
    """Run `work` in one BEGIN IMMEDIATE transaction: all of it is committed, or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _create_schema(statements: Sequence[str], version: int) -> Callable[[sqlite3.Connection], None]:
    def create(conn: sqlite3.Connection) -> None:
        for statement in statements:
            conn.execute(statement)
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = None if row is None else row[0]
        if found is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        elif found > version:
            raise RuntimeError(f"database schema version {found} is newer than this code ({version})")

    return create


def connect(
    path: Path, schema: Sequence[str], schema_version: int, *, pragmas: Sequence[str] = ()
) -> sqlite3.Connection:
    """Open (creating if needed) the database at `path`. `schema` must create a `schema_version(version)`
    table among its statements (all `IF NOT EXISTS`); `pragmas` are extra `PRAGMA …` statements."""
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
            in_transaction(conn, _create_schema(schema, schema_version))
            owner_only(path)
        except BaseException:
            conn.close()
            raise
    finally:
        os.umask(previous_umask)
    return conn
