"""SQLite vault store: WAL, synchronous=FULL, secure_delete=ON, every write one BEGIN IMMEDIATE transaction.

All database work runs on the kit's `SqliteWorker` (one thread owns the connection; the event loop never
blocks on disk). `secure_delete` overwrites erased content with zeros, so a destroyed
secret version or a deleted key leaves no wrapped bytes behind in free pages; and after such an erasure the WAL
is checkpointed and truncated (`wal_checkpoint(TRUNCATE)`, `journal_size_limit = 0`), so that the old frames
holding those bytes are gone from the -wal file too. The database, -wal and -shm files are owner-only (0600).
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from services.keyvault.model import KeyConfig, StoredKey, VersionRecord
from services.keyvault.store import (
    KEY_COLUMNS,
    SECRET_COLUMNS,
    VERSION_COLUMNS,
    RewrapDataKey,
    RewrapMaterial,
    RootChanged,
    SecretRecord,
    config_from_row,
    config_to_row,
    secret_from_row,
    version_from_row,
)
from tradeguard.storage.migrations import Migration
from tradeguard.storage.sqlite import SqliteWorker, in_transaction

__all__ = ["MIGRATIONS", "SqliteVaultStore"]

T = TypeVar("T")

# secure_delete: freed pages are zeroed; journal_size_limit 0: a checkpointed WAL is truncated, not kept
_PRAGMAS = ("PRAGMA secure_delete = ON", "PRAGMA journal_size_limit = 0")
_KEY_COLS = ", ".join(KEY_COLUMNS)
_VERSION_COLS = ", ".join(VERSION_COLUMNS)
_SECRET_COLS = ", ".join(SECRET_COLUMNS)

# Append-only: a released migration is never edited (see tradeguard.storage.migrations). Version 1 is the
# schema the store created before migrations existed (recorded then as schema_version 1).
_V1 = (
    "CREATE TABLE IF NOT EXISTS vault_meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT",
    """CREATE TABLE IF NOT EXISTS keys (
        name TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        min_decryption_version INTEGER NOT NULL,
        auto_rotate_period_us INTEGER NOT NULL,
        deletion_allowed INTEGER NOT NULL,
        create_us INTEGER NOT NULL,
        update_us INTEGER NOT NULL
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS key_versions (
        name TEXT NOT NULL REFERENCES keys (name) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        wrapped BLOB NOT NULL,
        public_key BLOB NOT NULL,
        create_us INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS key_usage (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        encryptions INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS secret_versions (
        owner TEXT NOT NULL,
        path TEXT NOT NULL,
        version INTEGER NOT NULL,
        wrapped_data_key BLOB,
        ciphertext BLOB,
        create_us INTEGER NOT NULL,
        destroy_us INTEGER NOT NULL,
        PRIMARY KEY (owner, path, version)
    ) STRICT""",
)
MIGRATIONS = (Migration(1, "meta, keys and their versions, usage counts, secret versions", _V1),)

_KEY_STAMP = "SELECT create_us, update_us FROM keys WHERE name = ?"
_SELECT_KEY = f"SELECT {_KEY_COLS} FROM keys WHERE name = ?"  # noqa: S608 - constant column names
_SELECT_VERSIONS = f"SELECT {_VERSION_COLS} FROM key_versions WHERE name = ? ORDER BY version"  # noqa: S608
_LIST_KEYS = f"SELECT {_KEY_COLS} FROM keys WHERE name > ? ORDER BY name LIMIT ?"  # noqa: S608
_SECRET_BY_VERSION = (
    f"SELECT {_SECRET_COLS} FROM secret_versions WHERE owner = ? AND path = ? AND version = ?"  # noqa: S608
)
_SECRET_LATEST = (
    f"SELECT {_SECRET_COLS} FROM secret_versions WHERE owner = ? AND path = ? "  # noqa: S608
    "ORDER BY version DESC LIMIT 1"
)
_LIST_VERSIONS_OF = (
    "SELECT owner, path, version, NULL, NULL, create_us, destroy_us FROM secret_versions "
    "WHERE owner = ? AND path = ? ORDER BY version"
)


def _scrub_wal(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database and truncate it: erased values must not survive in old WAL frames.

    A reader of another connection (another process on the same file) can keep the checkpoint from finishing;
    then the frames are overwritten or truncated by a later checkpoint (every erasure and close tries again)."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def _load_key(conn: sqlite3.Connection, row: tuple[object, ...]) -> StoredKey:
    config = config_from_row(row)
    versions = tuple(version_from_row(r) for r in conn.execute(_SELECT_VERSIONS, (config.name,)))
    return StoredKey(config=config, versions=versions)


class SqliteVaultStore:
    def __init__(self, worker: SqliteWorker) -> None:
        self.worker = worker
        self.path = worker.path
        self._fence: tuple[str, bytes] | None = None

    def fence(self, check_key: str, expected: bytes) -> None:
        self._fence = (check_key, expected)

    def _check_fence(self, conn: sqlite3.Connection) -> None:
        """Inside a write transaction (BEGIN IMMEDIATE: no other writer can move the ring meanwhile)."""
        if self._fence is None:
            return
        key, expected = self._fence
        row = conn.execute("SELECT value FROM vault_meta WHERE key = ?", (key,)).fetchone()
        if row is None or bytes(row[0]) != expected:
            raise RootChanged(key)

    @classmethod
    async def open(cls, path: Path) -> SqliteVaultStore:
        return cls(await SqliteWorker.open(path, MIGRATIONS, pragmas=_PRAGMAS, name="sqlite-vault"))

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self.worker.run(work)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self.worker.transaction(work)

    async def _write_and_scrub(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """A write that erases material: then checkpoint and truncate the WAL that still holds the old bytes."""

        def run(conn: sqlite3.Connection) -> T:
            result = in_transaction(conn, work)
            _scrub_wal(conn)
            return result

        return await self._run(run)

    async def get_meta(self, key: str) -> bytes | None:
        def work(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT value FROM vault_meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(work)

    async def put_meta_if_absent(self, key: str, value: bytes) -> bytes:
        def work(conn: sqlite3.Connection) -> bytes:
            conn.execute(
                "INSERT INTO vault_meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (key, value)
            )
            row = conn.execute("SELECT value FROM vault_meta WHERE key = ?", (key,)).fetchone()
            return bytes(row[0])

        return await self._write(work)

    async def create_key(self, config: KeyConfig, first: VersionRecord) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            self._check_fence(conn)
            placeholders = ", ".join("?" for _ in KEY_COLUMNS)
            inserted = conn.execute(
                f"INSERT INTO keys ({_KEY_COLS}) VALUES ({placeholders}) "  # noqa: S608
                "ON CONFLICT (name) DO NOTHING RETURNING name",
                config_to_row(config),
            ).fetchall()
            if not inserted:
                return False
            _insert_version(conn, config.name, first)
            return True

        return await self._write(work)

    async def key_stamp(self, name: str) -> tuple[int, int] | None:
        def work(conn: sqlite3.Connection) -> tuple[int, int] | None:
            row = conn.execute(_KEY_STAMP, (name,)).fetchone()
            return None if row is None else (int(row[0]), int(row[1]))

        return await self._run(work)

    async def get_key(self, name: str) -> StoredKey | None:
        def work(conn: sqlite3.Connection) -> StoredKey | None:
            row = conn.execute(_SELECT_KEY, (name,)).fetchone()
            return None if row is None else _load_key(conn, row)

        return await self._run(work)

    async def list_keys(self, after: str, limit: int) -> builtins.list[StoredKey]:
        def work(conn: sqlite3.Connection) -> builtins.list[StoredKey]:
            rows = conn.execute(_LIST_KEYS, (after, limit)).fetchall()
            return [_load_key(conn, row) for row in rows]

        return await self._run(work)

    async def add_version(
        self, name: str, record: VersionRecord, update_us: int, expected_update_us: int
    ) -> int | None:
        def work(conn: sqlite3.Connection) -> int | None:
            self._check_fence(conn)
            # BEGIN IMMEDIATE holds the write lock: check first, write only when the version is the next one.
            latest = conn.execute("SELECT max(version) FROM key_versions WHERE name = ?", (name,)).fetchone()
            if latest is None or latest[0] is None or latest[0] != record.version - 1:
                return None
            row = conn.execute(
                "UPDATE keys SET update_us = max(?, update_us + 1) WHERE name = ? AND update_us = ? "
                "RETURNING update_us",
                (update_us, name, expected_update_us),
            ).fetchone()
            if row is None:
                return None
            _insert_version(conn, name, record)
            return int(row[0])

        return await self._write(work)

    async def update_config(self, config: KeyConfig, expected_update_us: int) -> int | None:
        def work(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "UPDATE keys SET min_decryption_version = ?, auto_rotate_period_us = ?, deletion_allowed = ?, "
                "update_us = max(?, update_us + 1) WHERE name = ? AND update_us = ? RETURNING update_us",
                (
                    config.min_decryption_version,
                    config.auto_rotate_period_us,
                    config.deletion_allowed,
                    config.update_us,
                    config.name,
                    expected_update_us,
                ),
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._write(work)

    async def delete_key(self, name: str) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM key_versions WHERE name = ?", (name,))
            conn.execute("DELETE FROM key_usage WHERE name = ?", (name,))
            return conn.execute("DELETE FROM keys WHERE name = ?", (name,)).rowcount == 1

        return await self._write_and_scrub(work)

    async def add_encryptions(self, name: str, version: int, count: int) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "INSERT INTO key_usage (name, version, encryptions) VALUES (?, ?, ?) "
                "ON CONFLICT (name, version) DO UPDATE SET encryptions = encryptions + excluded.encryptions "
                "RETURNING encryptions",
                (name, version, count),
            ).fetchone()
            return int(row[0])

        return await self._write(work)

    async def insert_secret_version(self, record: SecretRecord) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            self._check_fence(conn)
            placeholders = ", ".join("?" for _ in SECRET_COLUMNS)
            rows = conn.execute(
                f"INSERT INTO secret_versions ({_SECRET_COLS}) VALUES ({placeholders}) "  # noqa: S608
                "ON CONFLICT DO NOTHING RETURNING version",
                (
                    record.owner,
                    record.path,
                    record.version,
                    record.wrapped_data_key,
                    record.ciphertext,
                    record.create_us,
                    record.destroy_us,
                ),
            ).fetchall()
            return bool(rows)

        return await self._write(work)

    async def get_secret_version(self, owner: str, path: str, version: int | None) -> SecretRecord | None:
        def work(conn: sqlite3.Connection) -> SecretRecord | None:
            if version is None:
                row = conn.execute(_SECRET_LATEST, (owner, path)).fetchone()
            else:
                row = conn.execute(_SECRET_BY_VERSION, (owner, path, version)).fetchone()
            return None if row is None else secret_from_row(row)

        return await self._run(work)

    async def list_secret_versions(self, owner: str, path: str) -> builtins.list[SecretRecord]:
        def work(conn: sqlite3.Connection) -> builtins.list[SecretRecord]:
            return [secret_from_row(row) for row in conn.execute(_LIST_VERSIONS_OF, (owner, path))]

        return await self._run(work)

    async def destroy_secret_version(self, owner: str, path: str, version: int, now_us: int) -> bool:
        def work(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE secret_versions SET wrapped_data_key = NULL, ciphertext = NULL, "
                "destroy_us = CASE WHEN destroy_us = 0 THEN ? ELSE destroy_us END "
                "WHERE owner = ? AND path = ? AND version = ?",
                (now_us, owner, path, version),
            )
            return cursor.rowcount == 1

        return await self._write_and_scrub(work)

    async def rewrap_all(
        self,
        check_key: str,
        expected_check: bytes,
        new_check: bytes,
        material: RewrapMaterial,
        data_key: RewrapDataKey,
    ) -> tuple[int, int]:
        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute("SELECT value FROM vault_meta WHERE key = ?", (check_key,)).fetchone()
            if row is None or bytes(row[0]) != expected_check:
                raise RootChanged(check_key)
            versions = conn.execute("SELECT name, version, wrapped FROM key_versions").fetchall()
            for name, version, wrapped in versions:
                conn.execute(
                    "UPDATE key_versions SET wrapped = ? WHERE name = ? AND version = ?",
                    (material(name, version, bytes(wrapped)), name, version),
                )
            secrets = conn.execute(
                "SELECT owner, path, version, wrapped_data_key FROM secret_versions "
                "WHERE wrapped_data_key IS NOT NULL"
            ).fetchall()
            for owner, path, version, wrapped in secrets:
                conn.execute(
                    "UPDATE secret_versions SET wrapped_data_key = ? WHERE owner = ? AND path = ? AND version = ?",
                    (data_key(owner, path, version, bytes(wrapped)), owner, path, version),
                )
            conn.execute("UPDATE vault_meta SET value = ? WHERE key = ?", (new_check, check_key))
            return len(versions), len(secrets)

        return await self._write_and_scrub(work)

    async def close(self) -> None:
        await self.worker.close()


def _insert_version(conn: sqlite3.Connection, name: str, record: VersionRecord) -> None:
    conn.execute(
        "INSERT INTO key_versions (name, version, wrapped, public_key, create_us) VALUES (?, ?, ?, ?, ?)",
        (name, record.version, record.wrapped, record.public_key, record.create_us),
    )
