"""The embedded-default SQLite connection: owner-only files, durable settings, versioned schema, atomic work."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from tradeguard.sqlite import connect, in_transaction

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
)


def test_files_are_owner_only_and_settings_durable(tmp_path: Path) -> None:
    path = tmp_path / "data" / "x.db"
    conn = connect(path, SCHEMA, 1)
    try:
        in_transaction(conn, lambda c: c.execute("INSERT INTO t VALUES ('a', 'b')"))
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        for name in ("x.db", "x.db-wal", "x.db-shm"):
            assert (os.stat(path.parent / name).st_mode & 0o777) == 0o600, name
        assert (os.stat(path.parent).st_mode & 0o777) == 0o700
    finally:
        conn.close()


def test_a_group_readable_database_is_tightened_on_open(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    connect(path, SCHEMA, 1).close()
    path.chmod(0o644)
    connect(path, SCHEMA, 1).close()
    assert (path.stat().st_mode & 0o777) == 0o600


def test_work_is_all_or_nothing(tmp_path: Path) -> None:
    conn = connect(tmp_path / "x.db", SCHEMA, 1)

    def half(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES ('a', 'b')")
        c.execute("INSERT INTO t VALUES ('a', 'again')")  # primary key violation: the first insert goes too

    with pytest.raises(sqlite3.IntegrityError):
        in_transaction(conn, half)
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    conn.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    connect(tmp_path / "x.db", SCHEMA, 3).close()
    with pytest.raises(RuntimeError, match="newer than this code"):
        connect(tmp_path / "x.db", SCHEMA, 2)
