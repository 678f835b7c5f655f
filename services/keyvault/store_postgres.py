"""PostgreSQL vault store over a psycopg 3 async connection pool; every write is one transaction.

A rotation appends version n + 1 only while n is the newest (the primary key on (name, version) and a row lock
on the key decide races between vault replicas). Secret versions are unique on (owner, path, version).
"""

from __future__ import annotations

import builtins
from typing import Any

from psycopg import AsyncConnection, sql

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
from tradeguard.storage.postgres import Pool, open_pool

__all__ = ["MIGRATIONS", "PostgresVaultStore"]


# Append-only: a released migration is never edited (see tradeguard.storage.migrations). Version 1 is the
# schema the store created before migrations existed (recorded then as schema_version 1).
_V1 = (
    "CREATE TABLE IF NOT EXISTS {schema}.vault_meta (key text PRIMARY KEY, value bytea NOT NULL)",
    """CREATE TABLE IF NOT EXISTS {schema}.keys (
        name text COLLATE "C" PRIMARY KEY,
        type text NOT NULL,
        min_decryption_version integer NOT NULL,
        auto_rotate_period_us bigint NOT NULL,
        deletion_allowed boolean NOT NULL,
        create_us bigint NOT NULL,
        update_us bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.key_versions (
        name text COLLATE "C" NOT NULL REFERENCES {schema}.keys (name) ON DELETE CASCADE,
        version integer NOT NULL,
        wrapped bytea NOT NULL,
        public_key bytea NOT NULL,
        create_us bigint NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.key_usage (
        name text COLLATE "C" NOT NULL,
        version integer NOT NULL,
        encryptions bigint NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.secret_versions (
        owner text COLLATE "C" NOT NULL,
        path text COLLATE "C" NOT NULL,
        version integer NOT NULL,
        wrapped_data_key bytea,
        ciphertext bytea,
        create_us bigint NOT NULL,
        destroy_us bigint NOT NULL,
        PRIMARY KEY (owner, path, version)
    )""",
)
MIGRATIONS = (Migration(1, "meta, keys and their versions, usage counts, secret versions", _V1),)


def _statements(schema: str) -> dict[str, sql.Composed]:
    fmt = {
        "meta": sql.Identifier(schema, "vault_meta"),
        "keys": sql.Identifier(schema, "keys"),
        "versions": sql.Identifier(schema, "key_versions"),
        "secrets": sql.Identifier(schema, "secret_versions"),
        "usage": sql.Identifier(schema, "key_usage"),
        "key_cols": sql.SQL(", ").join(sql.Identifier(c) for c in KEY_COLUMNS),
        "key_params": sql.SQL(", ").join(sql.Placeholder() for _ in KEY_COLUMNS),
        "version_cols": sql.SQL(", ").join(sql.Identifier(c) for c in VERSION_COLUMNS),
        "secret_cols": sql.SQL(", ").join(sql.Identifier(c) for c in SECRET_COLUMNS),
        "secret_params": sql.SQL(", ").join(sql.Placeholder() for _ in SECRET_COLUMNS),
    }
    q = {
        "get_meta": "SELECT value FROM {meta} WHERE key = %s",
        "put_meta": "INSERT INTO {meta} (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
        "lock_meta": "SELECT value FROM {meta} WHERE key = %s FOR UPDATE",
        "share_meta": "SELECT value FROM {meta} WHERE key = %s FOR SHARE",
        "set_meta": "UPDATE {meta} SET value = %s WHERE key = %s",
        "all_versions": "SELECT name, version, wrapped FROM {versions} ORDER BY name, version FOR UPDATE",
        "rewrap_version": "UPDATE {versions} SET wrapped = %s WHERE name = %s AND version = %s",
        "live_data_keys": "SELECT owner, path, version, wrapped_data_key FROM {secrets} "
        "WHERE wrapped_data_key IS NOT NULL ORDER BY owner, path, version FOR UPDATE",
        "rewrap_data_key": "UPDATE {secrets} SET wrapped_data_key = %s WHERE owner = %s AND path = %s "
        "AND version = %s",
        "create_key": "INSERT INTO {keys} ({key_cols}) VALUES ({key_params}) "
        "ON CONFLICT (name) DO NOTHING RETURNING name",
        "insert_version": "INSERT INTO {versions} (name, version, wrapped, public_key, create_us) "
        "VALUES (%s, %s, %s, %s, %s)",
        "select_key": "SELECT {key_cols} FROM {keys} WHERE name = %s",
        "key_stamp": "SELECT create_us, update_us FROM {keys} WHERE name = %s",
        "select_versions": "SELECT {version_cols} FROM {versions} WHERE name = %s ORDER BY version",
        "list_keys": "SELECT {key_cols} FROM {keys} WHERE name > %s ORDER BY name LIMIT %s",
        "lock_key": "SELECT update_us FROM {keys} WHERE name = %s FOR UPDATE",
        "bump_key": "UPDATE {keys} SET update_us = GREATEST(%s, update_us + 1) WHERE name = %s "
        "RETURNING update_us",
        "max_version": "SELECT max(version) FROM {versions} WHERE name = %s",
        "update_config": "UPDATE {keys} SET min_decryption_version = %s, auto_rotate_period_us = %s, "
        "deletion_allowed = %s, update_us = GREATEST(%s, update_us + 1) WHERE name = %s AND update_us = %s "
        "RETURNING update_us",
        "delete_key": "DELETE FROM {keys} WHERE name = %s",
        "delete_usage": "DELETE FROM {usage} WHERE name = %s",
        "add_encryptions": "INSERT INTO {usage} (name, version, encryptions) VALUES (%s, %s, %s) "
        "ON CONFLICT (name, version) DO UPDATE SET encryptions = {usage}.encryptions + excluded.encryptions "
        "RETURNING encryptions",
        "insert_secret": "INSERT INTO {secrets} ({secret_cols}) VALUES ({secret_params}) "
        "ON CONFLICT DO NOTHING RETURNING version",
        "secret_version": "SELECT {secret_cols} FROM {secrets} WHERE owner = %s AND path = %s AND version = %s",
        "secret_latest": "SELECT {secret_cols} FROM {secrets} WHERE owner = %s AND path = %s "
        "ORDER BY version DESC LIMIT 1",
        "secret_list": "SELECT owner, path, version, NULL, NULL, create_us, destroy_us FROM {secrets} "
        "WHERE owner = %s AND path = %s ORDER BY version",
        "secret_destroy": "UPDATE {secrets} SET wrapped_data_key = NULL, ciphertext = NULL, "
        "destroy_us = CASE WHEN destroy_us = 0 THEN %s ELSE destroy_us END "
        "WHERE owner = %s AND path = %s AND version = %s",
    }
    return {name: sql.SQL(text).format(**fmt) for name, text in q.items()}


class PostgresVaultStore:
    def __init__(self, pool: Pool, schema: str) -> None:
        self._pool = pool
        self.schema = schema
        self._sql = _statements(schema)
        self._fence: tuple[str, bytes] | None = None

    def fence(self, check_key: str, expected: bytes) -> None:
        self._fence = (check_key, expected)

    async def _check_fence(self, conn: AsyncConnection[tuple[Any, ...]]) -> None:
        """Inside the write's transaction. FOR SHARE: a migration (FOR UPDATE on the same row) waits for this
        write to commit, and re-wraps what it wrote; a write after a migration sees the new check and stops."""
        if self._fence is None:
            return
        key, expected = self._fence
        cur = await conn.execute(self._sql["share_meta"], (key,))
        row = await cur.fetchone()
        if row is None or bytes(row[0]) != expected:
            raise RootChanged(key)

    @classmethod
    async def open(
        cls, dsn: str, *, schema: str = "tradeguard_keyvault", min_size: int = 1, max_size: int = 10
    ) -> PostgresVaultStore:
        pool = await open_pool(dsn, schema, MIGRATIONS, min_size=min_size, max_size=max_size)
        return cls(pool, schema)

    async def _load_key(self, conn: AsyncConnection[tuple[Any, ...]], row: tuple[Any, ...]) -> StoredKey:
        config = config_from_row(row)
        cur = await conn.execute(self._sql["select_versions"], (config.name,))
        versions = tuple(version_from_row(r) for r in await cur.fetchall())
        return StoredKey(config=config, versions=versions)

    async def get_meta(self, key: str) -> bytes | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["get_meta"], (key,))
            row = await cur.fetchone()
        return None if row is None else bytes(row[0])

    async def put_meta_if_absent(self, key: str, value: bytes) -> bytes:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(self._sql["put_meta"], (key, value))
            cur = await conn.execute(self._sql["get_meta"], (key,))
            row = await cur.fetchone()
        assert row is not None
        return bytes(row[0])

    async def create_key(self, config: KeyConfig, first: VersionRecord) -> bool:
        async with self._pool.connection() as conn, conn.transaction():
            await self._check_fence(conn)
            cur = await conn.execute(self._sql["create_key"], config_to_row(config))
            if await cur.fetchone() is None:
                return False
            await conn.execute(
                self._sql["insert_version"],
                (config.name, first.version, first.wrapped, first.public_key, first.create_us),
            )
        return True

    async def key_stamp(self, name: str) -> tuple[int, int] | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["key_stamp"], (name,))
            row = await cur.fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    async def get_key(self, name: str) -> StoredKey | None:
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["select_key"], (name,))
            row = await cur.fetchone()
            return None if row is None else await self._load_key(conn, row)

    async def list_keys(self, after: str, limit: int) -> builtins.list[StoredKey]:
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["list_keys"], (after, limit))
            return [await self._load_key(conn, row) for row in await cur.fetchall()]

    async def add_version(
        self, name: str, record: VersionRecord, update_us: int, expected_update_us: int
    ) -> int | None:
        async with self._pool.connection() as conn, conn.transaction():
            await self._check_fence(conn)
            cur = await conn.execute(self._sql["lock_key"], (name,))  # row lock: rotations queue here
            locked = await cur.fetchone()
            if locked is None or locked[0] != expected_update_us:
                return None
            cur = await conn.execute(self._sql["max_version"], (name,))
            row = await cur.fetchone()
            if row is None or row[0] != record.version - 1:
                return None  # nothing written: the transaction commits no change
            cur = await conn.execute(self._sql["bump_key"], (update_us, name))
            bumped = await cur.fetchone()
            assert bumped is not None  # the row is locked by this transaction
            await conn.execute(
                self._sql["insert_version"],
                (name, record.version, record.wrapped, record.public_key, record.create_us),
            )
        return int(bumped[0])

    async def update_config(self, config: KeyConfig, expected_update_us: int) -> int | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                self._sql["update_config"],
                (
                    config.min_decryption_version,
                    config.auto_rotate_period_us,
                    config.deletion_allowed,
                    config.update_us,
                    config.name,
                    expected_update_us,
                ),
            )
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def delete_key(self, name: str) -> bool:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(self._sql["delete_usage"], (name,))
            cur = await conn.execute(self._sql["delete_key"], (name,))
            return cur.rowcount == 1

    async def add_encryptions(self, name: str, version: int, count: int) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["add_encryptions"], (name, version, count))
            row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async def insert_secret_version(self, record: SecretRecord) -> bool:
        async with self._pool.connection() as conn, conn.transaction():
            await self._check_fence(conn)
            cur = await conn.execute(
                self._sql["insert_secret"],
                (
                    record.owner,
                    record.path,
                    record.version,
                    record.wrapped_data_key,
                    record.ciphertext,
                    record.create_us,
                    record.destroy_us,
                ),
            )
            return await cur.fetchone() is not None

    async def get_secret_version(self, owner: str, path: str, version: int | None) -> SecretRecord | None:
        async with self._pool.connection() as conn:
            if version is None:
                cur = await conn.execute(self._sql["secret_latest"], (owner, path))
            else:
                cur = await conn.execute(self._sql["secret_version"], (owner, path, version))
            row = await cur.fetchone()
        return None if row is None else secret_from_row(row)

    async def list_secret_versions(self, owner: str, path: str) -> builtins.list[SecretRecord]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["secret_list"], (owner, path))
            return [secret_from_row(row) for row in await cur.fetchall()]

    async def destroy_secret_version(self, owner: str, path: str, version: int, now_us: int) -> bool:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._sql["secret_destroy"], (now_us, owner, path, version))
            return cur.rowcount == 1

    async def rewrap_all(
        self,
        check_key: str,
        expected_check: bytes,
        new_check: bytes,
        material: RewrapMaterial,
        data_key: RewrapDataKey,
    ) -> tuple[int, int]:
        """See `VaultStore.rewrap_all`. PostgreSQL keeps the old row versions until VACUUM and its WAL until
        recycled: where the old root must be treated as exposed, run VACUUM FULL on the schema afterwards."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(self._sql["lock_meta"], (check_key,))
            row = await cur.fetchone()
            if row is None or bytes(row[0]) != expected_check:
                raise RootChanged(check_key)
            cur = await conn.execute(self._sql["all_versions"])
            versions = await cur.fetchall()
            for name, version, wrapped in versions:
                await conn.execute(
                    self._sql["rewrap_version"], (material(name, version, bytes(wrapped)), name, version)
                )
            cur = await conn.execute(self._sql["live_data_keys"])
            secrets = await cur.fetchall()
            for owner, path, version, wrapped in secrets:
                rewrapped = data_key(owner, path, version, bytes(wrapped))
                await conn.execute(self._sql["rewrap_data_key"], (rewrapped, owner, path, version))
            await conn.execute(self._sql["set_meta"], (new_check, check_key))
        return len(versions), len(secrets)

    async def close(self) -> None:
        await self._pool.close()
