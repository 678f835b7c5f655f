"""PostgreSQL auth store over a psycopg 3 async connection pool, in a schema of its own ("tg_auth" by default).

Every write is one statement or one transaction, and the row decides races between auth replicas: a
compare-and-swap is `UPDATE … WHERE id = … AND version = expected` (a concurrent writer waits for the row lock and
then finds the version moved: exactly one wins); a spend is `UPDATE … WHERE used_time_us IS NULL` (the same
rule), so a refresh token or a recovery code is spent by exactly one caller. `confirm_totp` updates the user and
replaces the recovery codes in one transaction, nothing written when the version moved.

Rows hold exactly what `services.auth.model` holds: password hashes, key vault ciphertexts, public keys and
SHA-256 digests, never a secret in clear. Identifiers are `COLLATE "C"` (byte-wise, case-sensitive, like the
model's comparisons); sequences are `text[]`. Lookups are by primary key or an index (username, a user's keys, a
family's and a user's refresh tokens); the hot paths `get_api_key` and `get_user_by_name` are one SELECT, one round
trip (psycopg prepares them after a few calls).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

from psycopg import sql

from services.auth.model import ApiKey, ApiKeyKind, RefreshToken, Role, User
from services.auth.store import (
    API_KEY_COLUMNS,
    REFRESH_COLUMNS,
    USER_COLUMNS,
    key_to_row,
    key_update_params,
    refresh_to_row,
    user_to_row,
    user_update_params,
)
from tradeguard.storage.migrations import Migration
from tradeguard.storage.postgres import Pool, open_pool

__all__ = ["DEFAULT_SCHEMA", "MIGRATIONS", "PostgresAuthStore"]

DEFAULT_SCHEMA = "tg_auth"

# Append-only: a released migration is never edited (see tradeguard.storage.migrations).
_V1 = (
    """CREATE TABLE IF NOT EXISTS {schema}.users (
        user_id text COLLATE "C" PRIMARY KEY,
        username text COLLATE "C" NOT NULL UNIQUE,
        account_id text NOT NULL,
        roles text[] NOT NULL,
        password_hash text NOT NULL,
        create_time_us bigint NOT NULL,
        totp_seed text,
        totp_pending_seed text,
        version bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.recovery_codes (
        user_id text COLLATE "C" NOT NULL REFERENCES {schema}.users (user_id),
        code_hash text COLLATE "C" NOT NULL,
        used_time_us bigint,
        PRIMARY KEY (user_id, code_hash)
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.roles (
        name text COLLATE "C" PRIMARY KEY,
        permissions text[] NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {schema}.api_keys (
        key_id text COLLATE "C" PRIMARY KEY,
        user_id text COLLATE "C" NOT NULL,
        account_id text NOT NULL,
        kind text NOT NULL CHECK (kind IN ('hmac', 'ed25519')),
        scopes text[] NOT NULL,
        ip_allow_list text[] NOT NULL,
        tier text NOT NULL,
        create_time_us bigint NOT NULL,
        expire_time_us bigint NOT NULL,
        secret text,
        public_key bytea,
        previous_secret text,
        previous_public_key bytea,
        previous_expire_time_us bigint,
        revoke_time_us bigint,
        label text NOT NULL,
        version bigint NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS api_keys_user ON {schema}.api_keys (user_id, create_time_us, key_id)",
    """CREATE TABLE IF NOT EXISTS {schema}.refresh_tokens (
        token_hash text COLLATE "C" PRIMARY KEY,
        family_id text COLLATE "C" NOT NULL,
        user_id text COLLATE "C" NOT NULL,
        issue_time_us bigint NOT NULL,
        expire_time_us bigint NOT NULL,
        amr text[] NOT NULL,
        cnf_thumbprint text,
        used_time_us bigint,
        revoke_time_us bigint
    )""",
    "CREATE INDEX IF NOT EXISTS refresh_tokens_family ON {schema}.refresh_tokens (family_id)",
    "CREATE INDEX IF NOT EXISTS refresh_tokens_user ON {schema}.refresh_tokens (user_id)",
)
MIGRATIONS = (Migration(1, "users, recovery codes, roles, API keys, refresh tokens", _V1),)


def statements(schema: str) -> dict[str, sql.Composed]:
    """The store's SQL, with its tables in `schema`."""

    def cols(columns: Sequence[str]) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(c) for c in columns)

    def params(columns: Sequence[str]) -> sql.Composable:
        return sql.SQL(", ").join(sql.Placeholder() for _ in columns)

    fmt = {
        "users": sql.Identifier(schema, "users"),
        "codes": sql.Identifier(schema, "recovery_codes"),
        "roles": sql.Identifier(schema, "roles"),
        "keys": sql.Identifier(schema, "api_keys"),
        "tokens": sql.Identifier(schema, "refresh_tokens"),
        "u": cols(USER_COLUMNS),
        "u_params": params(USER_COLUMNS),
        "k": cols(API_KEY_COLUMNS),
        "k_params": params(API_KEY_COLUMNS),
        "r": cols(REFRESH_COLUMNS),
        "r_params": params(REFRESH_COLUMNS),
    }
    q = {
        "insert_user": "INSERT INTO {users} ({u}) VALUES ({u_params}) ON CONFLICT DO NOTHING",
        "get_user": "SELECT {u} FROM {users} WHERE user_id = %s",
        "get_user_by_name": "SELECT {u} FROM {users} WHERE username = %s",
        "update_user": "UPDATE {users} SET roles = %s, password_hash = %s, totp_seed = %s, "
        "totp_pending_seed = %s, version = %s WHERE user_id = %s AND version = %s",
        "delete_codes": "DELETE FROM {codes} WHERE user_id = %s",
        "insert_codes": "INSERT INTO {codes} (user_id, code_hash) SELECT %s, unnest(%s::text[]) "
        "ON CONFLICT DO NOTHING",
        "use_code": "UPDATE {codes} SET used_time_us = %s "
        "WHERE user_id = %s AND code_hash = %s AND used_time_us IS NULL",
        "unused_codes": "SELECT count(*) FROM {codes} WHERE user_id = %s AND used_time_us IS NULL",
        "put_role": "INSERT INTO {roles} (name, permissions) VALUES (%s, %s) "
        "ON CONFLICT (name) DO UPDATE SET permissions = excluded.permissions",
        "list_roles": "SELECT name, permissions FROM {roles} ORDER BY name",
        "insert_key": "INSERT INTO {keys} ({k}) VALUES ({k_params}) ON CONFLICT DO NOTHING",
        "get_key": "SELECT {k} FROM {keys} WHERE key_id = %s",
        "list_keys": "SELECT {k} FROM {keys} WHERE user_id = %s ORDER BY create_time_us, key_id",
        "update_key": "UPDATE {keys} SET scopes = %s, expire_time_us = %s, secret = %s, public_key = %s, "
        "previous_secret = %s, previous_public_key = %s, previous_expire_time_us = %s, revoke_time_us = %s, "
        "version = %s WHERE key_id = %s AND version = %s",
        "insert_refresh": "INSERT INTO {tokens} ({r}) VALUES ({r_params}) ON CONFLICT DO NOTHING",
        "spend_refresh": "UPDATE {tokens} SET used_time_us = %s WHERE token_hash = %s "
        "AND used_time_us IS NULL AND revoke_time_us IS NULL RETURNING {r}",
        "get_refresh": "SELECT {r} FROM {tokens} WHERE token_hash = %s",
        "revoke_family": "UPDATE {tokens} SET revoke_time_us = %s WHERE family_id = %s AND revoke_time_us IS NULL",
        "revoke_user": "UPDATE {tokens} SET revoke_time_us = %s WHERE user_id = %s AND revoke_time_us IS NULL "
        "RETURNING family_id, used_time_us, expire_time_us",
    }
    return {name: sql.SQL(text).format(**fmt) for name, text in q.items()}


def _user(row: Sequence[Any]) -> User:
    user_id, username, account_id, roles, password_hash, create, seed, pending, version = row
    return User(
        user_id=user_id,
        username=username,
        account_id=account_id,
        roles=tuple(roles),
        password_hash=password_hash,
        create_time_us=create,
        totp_seed=seed,
        totp_pending_seed=pending,
        version=version,
    )


def _opt_bytes(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


def _key(row: Sequence[Any]) -> ApiKey:
    (
        key_id,
        user_id,
        account_id,
        kind,
        scopes,
        ip_allow_list,
        tier,
        create,
        expire,
        secret,
        public_key,
        previous_secret,
        previous_public_key,
        previous_expire,
        revoke,
        label,
        version,
    ) = row
    return ApiKey(
        key_id=key_id,
        user_id=user_id,
        account_id=account_id,
        kind=ApiKeyKind(kind),
        scopes=frozenset(scopes),
        ip_allow_list=tuple(ip_allow_list),
        tier=tier,
        create_time_us=create,
        expire_time_us=expire,
        secret=secret,
        public_key=_opt_bytes(public_key),
        previous_secret=previous_secret,
        previous_public_key=_opt_bytes(previous_public_key),
        previous_expire_time_us=previous_expire,
        revoke_time_us=revoke,
        label=label,
        version=version,
    )


def _refresh(row: Sequence[Any]) -> RefreshToken:
    token_hash, family_id, user_id, issue, expire, amr, cnf, used, revoke = row
    return RefreshToken(
        token_hash=token_hash,
        family_id=family_id,
        user_id=user_id,
        issue_time_us=issue,
        expire_time_us=expire,
        amr=tuple(amr),
        cnf_thumbprint=cnf,
        used_time_us=used,
        revoke_time_us=revoke,
    )


class PostgresAuthStore:
    """The `AuthStore` in one PostgreSQL schema (see the module)."""

    def __init__(self, pool: Pool, schema: str) -> None:
        self._pool = pool
        self.schema = schema
        self.sql = statements(schema)

    @classmethod
    async def open(
        cls, dsn: str, *, schema: str = DEFAULT_SCHEMA, min_size: int = 1, max_size: int = 10
    ) -> PostgresAuthStore:
        """Open the pool and bring `schema` to the store's last migration (created if absent)."""
        pool = await open_pool(dsn, schema, MIGRATIONS, min_size=min_size, max_size=max_size)
        return cls(pool, schema)

    async def _one(self, name: str, params: Sequence[object]) -> tuple[Any, ...] | None:
        """One statement in its own (autocommit) transaction; its first row."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql[name], params)
            return await cur.fetchone() if cur.description else None

    async def _count(self, name: str, params: Sequence[object]) -> int:
        """One statement in its own transaction; the rows it changed."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql[name], params)
            return cur.rowcount

    # --- users -------------------------------------------------------------------------------------------------
    async def insert_user(self, user: User) -> bool:
        return await self._count("insert_user", user_to_row(user, list)) == 1

    async def get_user(self, user_id: str) -> User | None:
        row = await self._one("get_user", (user_id,))
        return None if row is None else _user(row)

    async def get_user_by_name(self, username: str) -> User | None:
        row = await self._one("get_user_by_name", (username,))
        return None if row is None else _user(row)

    async def update_user(self, user: User, expected_version: int) -> bool:
        return await self._count("update_user", user_update_params(user, expected_version, list)) == 1

    async def confirm_totp(self, user: User, expected_version: int, recovery_code_hashes: list[str]) -> bool:
        params = user_update_params(user, expected_version, list)
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(self.sql["update_user"], params)
            if cur.rowcount != 1:
                return False  # nothing written: the transaction commits no change
            await conn.execute(self.sql["delete_codes"], (user.user_id,))
            await conn.execute(self.sql["insert_codes"], (user.user_id, list(recovery_code_hashes)))
        return True

    async def use_recovery_code(self, user_id: str, code_hash: str, now_us: int) -> bool:
        return await self._count("use_code", (now_us, user_id, code_hash)) == 1

    async def unused_recovery_codes(self, user_id: str) -> int:
        row = await self._one("unused_codes", (user_id,))
        return 0 if row is None else int(row[0])

    # --- roles -------------------------------------------------------------------------------------------------
    async def put_role(self, role: Role) -> None:
        await self._count("put_role", (role.name, sorted(role.permissions)))

    async def list_roles(self) -> builtins.list[Role]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["list_roles"])
            rows = await cur.fetchall()
        return [Role(name=name, permissions=frozenset(permissions)) for name, permissions in rows]

    # --- API keys ----------------------------------------------------------------------------------------------
    async def insert_api_key(self, key: ApiKey) -> bool:
        return await self._count("insert_key", key_to_row(key, list)) == 1

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        row = await self._one("get_key", (key_id,))
        return None if row is None else _key(row)

    async def list_api_keys(self, user_id: str) -> builtins.list[ApiKey]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["list_keys"], (user_id,))
            rows = await cur.fetchall()
        return [_key(row) for row in rows]

    async def update_api_key(self, key: ApiKey, expected_version: int) -> bool:
        params = key_update_params(key, expected_version, list)
        return await self._count("update_key", params) == 1

    # --- refresh tokens ----------------------------------------------------------------------------------------
    async def insert_refresh_token(self, token: RefreshToken) -> None:
        if await self._count("insert_refresh", refresh_to_row(token, list)) != 1:
            raise ValueError("a refresh token with this hash is already stored")

    async def use_refresh_token(self, token_hash: str, now_us: int) -> tuple[RefreshToken | None, bool]:
        async with self._pool.connection() as conn:
            # The winner's UPDATE returns the row; a loser waited for the winner's row lock, found the token
            # used, and changed nothing. Its next statement (a new snapshot) sees the winner's commit.
            cur = await conn.execute(self.sql["spend_refresh"], (now_us, token_hash))
            spent = await cur.fetchone()
            if spent is not None:
                return _refresh(spent), True
            cur = await conn.execute(self.sql["get_refresh"], (token_hash,))
            row = await cur.fetchone()
        return (None if row is None else _refresh(row)), False

    async def revoke_family(self, family_id: str, now_us: int) -> None:
        await self._count("revoke_family", (now_us, family_id))

    async def revoke_user_families(self, user_id: str, now_us: int) -> builtins.list[str]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self.sql["revoke_user"], (now_us, user_id))
            rows = await cur.fetchall()
        # Live: neither used nor expired (nor revoked before: those rows were not updated).
        return sorted({family for family, used, expire in rows if used is None and expire > now_us})

    async def close(self) -> None:
        """Close the pool; later calls are refused (psycopg_pool.PoolClosed)."""
        await self._pool.close()
