"""SQLite auth store (the embedded default): WAL, synchronous=FULL, every write one BEGIN IMMEDIATE transaction.

All database work runs on the kit's `SqliteWorker` (one thread owns the connection; the event loop never blocks
on disk). A write is one BEGIN IMMEDIATE transaction, which takes the database's write lock before it reads, so a
compare-and-swap (`update_user`, `update_api_key`, `confirm_totp`) or a spend (`use_refresh_token`,
`use_recovery_code`) cannot interleave with another writer, in this process or another one on the same file. A
caller is answered only after its COMMIT returned; a write that has started runs to COMMIT or ROLLBACK on the
worker thread even if its caller is cancelled.

Rows hold exactly what `services.auth.model` holds: password hashes, key vault ciphertexts, public keys and
SHA-256 digests, never a secret in clear. Sequences (roles, scopes, CIDRs, amr, permissions) are JSON arrays.
Lookups are by primary key or an index (username, a user's keys, a family's and a user's refresh tokens); the hot
paths `get_api_key` and `get_user_by_name` are one SELECT each.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
from tradeguard.storage.sqlite import SqliteWorker

__all__ = ["MIGRATIONS", "SqliteAuthStore"]

T = TypeVar("T")

# Append-only: a released migration is never edited (see tradeguard.storage.migrations).
_V1 = (
    """CREATE TABLE IF NOT EXISTS users (
        user_id TEXT PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        account_id TEXT NOT NULL,
        roles TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        create_time_us INTEGER NOT NULL,
        totp_seed TEXT,
        totp_pending_seed TEXT,
        version INTEGER NOT NULL
    ) STRICT""",
    """CREATE TABLE IF NOT EXISTS recovery_codes (
        user_id TEXT NOT NULL REFERENCES users (user_id),
        code_hash TEXT NOT NULL,
        used_time_us INTEGER,
        PRIMARY KEY (user_id, code_hash)
    ) STRICT""",
    "CREATE TABLE IF NOT EXISTS roles (name TEXT PRIMARY KEY, permissions TEXT NOT NULL) STRICT",
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        account_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('hmac', 'ed25519')),
        scopes TEXT NOT NULL,
        ip_allow_list TEXT NOT NULL,
        tier TEXT NOT NULL,
        create_time_us INTEGER NOT NULL,
        expire_time_us INTEGER NOT NULL,
        secret TEXT,
        public_key BLOB,
        previous_secret TEXT,
        previous_public_key BLOB,
        previous_expire_time_us INTEGER,
        revoke_time_us INTEGER,
        label TEXT NOT NULL,
        version INTEGER NOT NULL
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user_id, create_time_us, key_id)",
    """CREATE TABLE IF NOT EXISTS refresh_tokens (
        token_hash TEXT PRIMARY KEY,
        family_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        issue_time_us INTEGER NOT NULL,
        expire_time_us INTEGER NOT NULL,
        amr TEXT NOT NULL,
        cnf_thumbprint TEXT,
        used_time_us INTEGER,
        revoke_time_us INTEGER
    ) STRICT""",
    "CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family_id)",
    "CREATE INDEX IF NOT EXISTS refresh_tokens_user ON refresh_tokens (user_id)",
)
MIGRATIONS = (Migration(1, "users, recovery codes, roles, API keys, refresh tokens", _V1),)


def _cols(columns: Sequence[str]) -> str:
    return ", ".join(columns)


def _marks(columns: Sequence[str]) -> str:
    return ", ".join("?" for _ in columns)


_U, _K, _R = _cols(USER_COLUMNS), _cols(API_KEY_COLUMNS), _cols(REFRESH_COLUMNS)
# Constant column names only (no user input) in every f-string below.
SQL = {
    "insert_user": f"INSERT INTO users ({_U}) VALUES ({_marks(USER_COLUMNS)}) ON CONFLICT DO NOTHING",  # noqa: S608
    "get_user": f"SELECT {_U} FROM users WHERE user_id = ?",  # noqa: S608
    "get_user_by_name": f"SELECT {_U} FROM users WHERE username = ?",  # noqa: S608
    "update_user": "UPDATE users SET roles = ?, password_hash = ?, totp_seed = ?, totp_pending_seed = ?, "
    "version = ? WHERE user_id = ? AND version = ?",
    "delete_codes": "DELETE FROM recovery_codes WHERE user_id = ?",
    "insert_code": "INSERT INTO recovery_codes (user_id, code_hash, used_time_us) VALUES (?, ?, NULL) "
    "ON CONFLICT DO NOTHING",
    "use_code": "UPDATE recovery_codes SET used_time_us = ? "
    "WHERE user_id = ? AND code_hash = ? AND used_time_us IS NULL",
    "unused_codes": "SELECT count(*) FROM recovery_codes WHERE user_id = ? AND used_time_us IS NULL",
    "put_role": "INSERT INTO roles (name, permissions) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET permissions = excluded.permissions",
    "list_roles": "SELECT name, permissions FROM roles ORDER BY name",
    "insert_key": f"INSERT INTO api_keys ({_K}) VALUES ({_marks(API_KEY_COLUMNS)}) ON CONFLICT DO NOTHING",  # noqa: S608
    "get_key": f"SELECT {_K} FROM api_keys WHERE key_id = ?",  # noqa: S608
    "list_keys": f"SELECT {_K} FROM api_keys WHERE user_id = ? ORDER BY create_time_us, key_id",  # noqa: S608
    "update_key": "UPDATE api_keys SET scopes = ?, expire_time_us = ?, secret = ?, public_key = ?, "
    "previous_secret = ?, previous_public_key = ?, previous_expire_time_us = ?, revoke_time_us = ?, "
    "version = ? WHERE key_id = ? AND version = ?",
    "insert_refresh": f"INSERT INTO refresh_tokens ({_R}) VALUES ({_marks(REFRESH_COLUMNS)}) "  # noqa: S608
    "ON CONFLICT DO NOTHING",
    "spend_refresh": f"UPDATE refresh_tokens SET used_time_us = ? WHERE token_hash = ? "  # noqa: S608
    f"AND used_time_us IS NULL AND revoke_time_us IS NULL RETURNING {_R}",
    "get_refresh": f"SELECT {_R} FROM refresh_tokens WHERE token_hash = ?",  # noqa: S608
    "revoke_family": "UPDATE refresh_tokens SET revoke_time_us = ? "
    "WHERE family_id = ? AND revoke_time_us IS NULL",
    "revoke_user": "UPDATE refresh_tokens SET revoke_time_us = ? WHERE user_id = ? AND revoke_time_us IS NULL "
    "RETURNING family_id, used_time_us, expire_time_us",
}


def _list(value: Sequence[str]) -> str:
    return json.dumps(list(value), separators=(",", ":"))


def _strings(value: object) -> list[str]:
    items = json.loads(str(value))
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError("a list column does not hold a JSON array of strings")
    return items


def _opt_int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _opt_bytes(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def _user(row: Sequence[Any]) -> User:
    user_id, username, account_id, roles, password_hash, create, seed, pending, version = row
    return User(
        user_id=str(user_id),
        username=str(username),
        account_id=str(account_id),
        roles=tuple(_strings(roles)),
        password_hash=str(password_hash),
        create_time_us=int(create),
        totp_seed=_opt_str(seed),
        totp_pending_seed=_opt_str(pending),
        version=int(version),
    )


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
        key_id=str(key_id),
        user_id=str(user_id),
        account_id=str(account_id),
        kind=ApiKeyKind(kind),
        scopes=frozenset(_strings(scopes)),
        ip_allow_list=tuple(_strings(ip_allow_list)),
        tier=str(tier),
        create_time_us=int(create),
        expire_time_us=int(expire),
        secret=_opt_str(secret),
        public_key=_opt_bytes(public_key),
        previous_secret=_opt_str(previous_secret),
        previous_public_key=_opt_bytes(previous_public_key),
        previous_expire_time_us=_opt_int(previous_expire),
        revoke_time_us=_opt_int(revoke),
        label=str(label),
        version=int(version),
    )


def _refresh(row: Sequence[Any]) -> RefreshToken:
    token_hash, family_id, user_id, issue, expire, amr, cnf, used, revoke = row
    return RefreshToken(
        token_hash=str(token_hash),
        family_id=str(family_id),
        user_id=str(user_id),
        issue_time_us=int(issue),
        expire_time_us=int(expire),
        amr=tuple(_strings(amr)),
        cnf_thumbprint=_opt_str(cnf),
        used_time_us=_opt_int(used),
        revoke_time_us=_opt_int(revoke),
    )


class SqliteAuthStore:
    """The `AuthStore` on one SQLite file (see the module)."""

    def __init__(self, worker: SqliteWorker) -> None:
        self.worker = worker
        self.path = worker.path

    @classmethod
    async def open(cls, path: Path) -> SqliteAuthStore:
        """Open (creating and migrating if needed) the store at `path` (owner-only files)."""
        return cls(await SqliteWorker.open(path, MIGRATIONS, name="sqlite-auth"))

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self.worker.run(work)

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self.worker.transaction(work)

    # --- users -------------------------------------------------------------------------------------------------
    async def insert_user(self, user: User) -> bool:
        row = user_to_row(user, _list)
        return await self._write(lambda conn: conn.execute(SQL["insert_user"], row).rowcount == 1)

    async def get_user(self, user_id: str) -> User | None:
        row = await self._read(lambda conn: conn.execute(SQL["get_user"], (user_id,)).fetchone())
        return None if row is None else _user(row)

    async def get_user_by_name(self, username: str) -> User | None:
        row = await self._read(lambda conn: conn.execute(SQL["get_user_by_name"], (username,)).fetchone())
        return None if row is None else _user(row)

    async def update_user(self, user: User, expected_version: int) -> bool:
        params = user_update_params(user, expected_version, _list)  # the version checked before any write
        return await self._write(lambda conn: conn.execute(SQL["update_user"], params).rowcount == 1)

    async def confirm_totp(self, user: User, expected_version: int, recovery_code_hashes: list[str]) -> bool:
        params = user_update_params(user, expected_version, _list)  # the version checked before any write
        codes = list(recovery_code_hashes)

        def work(conn: sqlite3.Connection) -> bool:
            if conn.execute(SQL["update_user"], params).rowcount != 1:
                return False
            conn.execute(SQL["delete_codes"], (user.user_id,))
            conn.executemany(SQL["insert_code"], [(user.user_id, code) for code in codes])
            return True

        return await self._write(work)

    async def use_recovery_code(self, user_id: str, code_hash: str, now_us: int) -> bool:
        params = (now_us, user_id, code_hash)
        return await self._write(lambda conn: conn.execute(SQL["use_code"], params).rowcount == 1)

    async def unused_recovery_codes(self, user_id: str) -> int:
        row = await self._read(lambda conn: conn.execute(SQL["unused_codes"], (user_id,)).fetchone())
        return 0 if row is None else int(row[0])

    # --- roles -------------------------------------------------------------------------------------------------
    async def put_role(self, role: Role) -> None:
        params = (role.name, _list(sorted(role.permissions)))
        await self._write(lambda conn: conn.execute(SQL["put_role"], params))

    async def list_roles(self) -> builtins.list[Role]:
        rows = await self._read(lambda conn: conn.execute(SQL["list_roles"]).fetchall())
        return [Role(name=str(name), permissions=frozenset(_strings(perms))) for name, perms in rows]

    # --- API keys ----------------------------------------------------------------------------------------------
    async def insert_api_key(self, key: ApiKey) -> bool:
        row = key_to_row(key, _list)
        return await self._write(lambda conn: conn.execute(SQL["insert_key"], row).rowcount == 1)

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        row = await self._read(lambda conn: conn.execute(SQL["get_key"], (key_id,)).fetchone())
        return None if row is None else _key(row)

    async def list_api_keys(self, user_id: str) -> builtins.list[ApiKey]:
        rows = await self._read(lambda conn: conn.execute(SQL["list_keys"], (user_id,)).fetchall())
        return [_key(row) for row in rows]

    async def update_api_key(self, key: ApiKey, expected_version: int) -> bool:
        params = key_update_params(key, expected_version, _list)
        return await self._write(lambda conn: conn.execute(SQL["update_key"], params).rowcount == 1)

    # --- refresh tokens ----------------------------------------------------------------------------------------
    async def insert_refresh_token(self, token: RefreshToken) -> None:
        row = refresh_to_row(token, _list)
        inserted = await self._write(lambda conn: conn.execute(SQL["insert_refresh"], row).rowcount == 1)
        if not inserted:
            raise ValueError("a refresh token with this hash is already stored")

    async def use_refresh_token(self, token_hash: str, now_us: int) -> tuple[RefreshToken | None, bool]:
        def work(conn: sqlite3.Connection) -> tuple[RefreshToken | None, bool]:
            spent = conn.execute(SQL["spend_refresh"], (now_us, token_hash)).fetchone()
            if spent is not None:
                return _refresh(spent), True
            row = conn.execute(SQL["get_refresh"], (token_hash,)).fetchone()
            return (None if row is None else _refresh(row)), False

        return await self._write(work)

    async def revoke_family(self, family_id: str, now_us: int) -> None:
        await self._write(lambda conn: conn.execute(SQL["revoke_family"], (now_us, family_id)))

    async def revoke_user_families(self, user_id: str, now_us: int) -> builtins.list[str]:
        rows = await self._write(lambda conn: conn.execute(SQL["revoke_user"], (now_us, user_id)).fetchall())
        # Live: neither used nor expired (nor revoked before: those rows were not updated).
        return sorted({str(family) for family, used, expire in rows if used is None and int(expire) > now_us})

    async def close(self) -> None:
        """Close the connection after the work already handed over; later calls are refused."""
        await self.worker.close()
