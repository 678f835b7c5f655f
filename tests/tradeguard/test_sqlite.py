"""The embedded-default SQLite connection: owner-only files, durable settings, migrated schema, atomic work, and
`SqliteWorker` (one thread owns the connection). Migrations on both backends: tests/tradeguard/test_migrations.py."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from tradeguard.storage.migrations import Migration
from tradeguard.storage.sqlite import SqliteWorker, connect, in_transaction
from tradeguard.testing import eventually

SCHEMA = (Migration(1, "t", ["CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT NOT NULL)"]),)


def test_files_are_owner_only_and_settings_durable(tmp_path: Path) -> None:
    path = tmp_path / "data" / "x.db"
    conn = connect(path, SCHEMA)
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
    connect(path, SCHEMA).close()
    path.chmod(0o644)
    connect(path, SCHEMA).close()
    assert (path.stat().st_mode & 0o777) == 0o600


def test_work_is_all_or_nothing(tmp_path: Path) -> None:
    conn = connect(tmp_path / "x.db", SCHEMA)

    def half(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES ('a', 'b')")
        c.execute("INSERT INTO t VALUES ('a', 'again')")  # primary key violation: the first insert goes too

    with pytest.raises(sqlite3.IntegrityError):
        in_transaction(conn, half)
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    conn.close()


async def test_worker_runs_everything_on_one_thread_in_order(tmp_path: Path) -> None:
    worker = await SqliteWorker.open(tmp_path / "w.db", SCHEMA, name="test-worker")
    try:
        threads = await asyncio.gather(
            *(worker.run(lambda _c: threading.current_thread()) for _ in range(20))
        )
        assert len(set(threads)) == 1 and threads[0] is not threading.current_thread()
        assert threads[0].name.startswith("test-worker")

        async def put(i: int) -> None:
            await worker.transaction(lambda c: c.execute("INSERT INTO t VALUES (?, ?)", (f"k{i:02}", str(i))))

        await asyncio.gather(*(put(i) for i in range(50)))
        rows = await worker.run(lambda c: c.execute("SELECT k FROM t ORDER BY rowid").fetchall())
        assert [k for (k,) in rows] == [f"k{i:02}" for i in range(50)]  # handed over in order, run in order
    finally:
        await worker.close()


async def test_worker_transaction_is_all_or_nothing(tmp_path: Path) -> None:
    worker = await SqliteWorker.open(tmp_path / "w.db", SCHEMA)

    def half(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES ('a', 'b')")
        raise ValueError("after the first insert")

    with pytest.raises(ValueError, match="after the first insert"):
        await worker.transaction(half)
    assert await worker.run(lambda c: c.execute("SELECT count(*) FROM t").fetchone()) == (0,)
    assert await worker.run(lambda c: c.in_transaction) is False  # nothing left open on the connection
    await worker.close()


async def test_worker_finishes_started_work_when_its_caller_is_cancelled_then_closes(tmp_path: Path) -> None:
    worker = await SqliteWorker.open(tmp_path / "w.db", SCHEMA)
    entered, release = threading.Event(), threading.Event()

    def slow(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES ('slow', 'started')")
        entered.set()
        release.wait(10)
        c.execute("UPDATE t SET v = 'finished' WHERE k = 'slow'")

    try:
        caller = asyncio.ensure_future(worker.transaction(slow))
        await eventually(entered.is_set)
        caller.cancel()
        queued = asyncio.ensure_future(worker.run(lambda c: c.execute("SELECT v FROM t").fetchall()))
        closing = asyncio.ensure_future(worker.close())  # waits for the work handed over before it
        await asyncio.sleep(0)
        assert not closing.done()
    finally:
        release.set()
    await closing
    assert await queued == [("finished",)]  # the cancelled caller's transaction still committed, whole
    assert worker.closed
    with pytest.raises(RuntimeError, match="closed"):
        await worker.run(lambda c: None)
    await worker.close()  # idempotent
    conn = sqlite3.connect(tmp_path / "w.db")
    assert conn.execute("SELECT v FROM t").fetchall() == [("finished",)]
    conn.close()


async def test_worker_open_failure_leaves_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    bad = (Migration(1, "broken", ["CREATE TABLE oops ("]),)
    with pytest.raises(sqlite3.OperationalError):
        await SqliteWorker.open(tmp_path / "w.db", bad, name="doomed")
    await eventually(lambda: threading.active_count() <= before)
