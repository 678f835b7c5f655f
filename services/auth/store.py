"""Where the auth service's records live: the `AuthStore` protocol (SQLite embedded, PostgreSQL in production).

Every method is atomic. Methods that change a record either take the version the caller read and succeed only if
it is still current (compare-and-swap, returning False otherwise) or are conditional updates whose condition is
stated below; concurrent callers on several replicas sharing one PostgreSQL see exactly one winner.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Protocol

from services.auth.model import ApiKey, RefreshToken, Role, User

__all__ = [
    "API_KEY_COLUMNS",
    "REFRESH_COLUMNS",
    "SCHEMA_VERSION",
    "USER_COLUMNS",
    "AuthStore",
    "ListEncoding",
    "check_next_version",
    "key_to_row",
    "refresh_to_row",
    "user_to_row",
]

SCHEMA_VERSION = 1


class AuthStore(Protocol):
    # --- users -------------------------------------------------------------------------------------------------
    async def insert_user(self, user: User) -> bool:
        """Insert `user`; False (nothing written) when its user id or username exists."""
        ...

    async def get_user(self, user_id: str) -> User | None: ...

    async def get_user_by_name(self, username: str) -> User | None: ...

    async def update_user(self, user: User, expected_version: int) -> bool:
        """Replace the user's roles, password hash and TOTP fields with `user`'s (whose `version` must be
        `expected_version + 1`) if the stored version is still `expected_version`; False otherwise."""
        ...

    async def confirm_totp(self, user: User, expected_version: int, recovery_code_hashes: list[str]) -> bool:
        """`update_user` (the confirmed seed moved from pending to `totp_seed`) and the user's recovery codes
        replaced by `recovery_code_hashes`, in one transaction; False (nothing written) if the version moved."""
        ...

    async def use_recovery_code(self, user_id: str, code_hash: str, now_us: int) -> bool:
        """Mark the user's unused recovery code with this hash used; True only for the one caller that did."""
        ...

    async def unused_recovery_codes(self, user_id: str) -> int: ...

    # --- roles -------------------------------------------------------------------------------------------------
    async def put_role(self, role: Role) -> None:
        """Create or replace the role."""
        ...

    async def list_roles(self) -> builtins.list[Role]: ...

    # --- API keys ----------------------------------------------------------------------------------------------
    async def insert_api_key(self, key: ApiKey) -> bool:
        """Insert `key`; False when its key id exists."""
        ...

    async def get_api_key(self, key_id: str) -> ApiKey | None: ...

    async def list_api_keys(self, user_id: str) -> builtins.list[ApiKey]: ...

    async def update_api_key(self, key: ApiKey, expected_version: int) -> bool:
        """Replace the key's secret fields, scopes, revocation and expiry with `key`'s (version
        `expected_version + 1`) if the stored version is still `expected_version`; False otherwise."""
        ...

    # --- refresh tokens ----------------------------------------------------------------------------------------
    async def insert_refresh_token(self, token: RefreshToken) -> None: ...

    async def use_refresh_token(self, token_hash: str, now_us: int) -> tuple[RefreshToken | None, bool]:
        """(the token, whether THIS call spent it). The first call on an unused, unrevoked token marks it used and
        gets True; every later call gets the record with False (a reuse: the caller revokes the family). None
        when no such token exists."""
        ...

    async def revoke_family(self, family_id: str, now_us: int) -> None:
        """Revoke every refresh token of the family (idempotent)."""
        ...

    async def revoke_user_families(self, user_id: str, now_us: int) -> builtins.list[str]:
        """Revoke every refresh token of the user; the family ids that had live tokens."""
        ...

    async def close(self) -> None: ...


# The tables' columns in the order both backends write and read them (store_sqlite.py, store_postgres.py).
USER_COLUMNS = (
    "user_id",
    "username",
    "account_id",
    "roles",
    "password_hash",
    "create_time_us",
    "totp_seed",
    "totp_pending_seed",
    "version",
)
API_KEY_COLUMNS = (
    "key_id",
    "user_id",
    "account_id",
    "kind",
    "scopes",
    "ip_allow_list",
    "tier",
    "create_time_us",
    "expire_time_us",
    "secret",
    "public_key",
    "previous_secret",
    "previous_public_key",
    "previous_expire_time_us",
    "revoke_time_us",
    "label",
    "version",
)
REFRESH_COLUMNS = (
    "token_hash",
    "family_id",
    "user_id",
    "issue_time_us",
    "expire_time_us",
    "amr",
    "cnf_thumbprint",
    "used_time_us",
    "revoke_time_us",
)


def check_next_version(current: int, expected_version: int, what: str) -> None:
    """A compare-and-swap writes version `expected_version + 1`; anything else is the caller's mistake."""
    if current != expected_version + 1:
        raise ValueError(f"the new {what} version must be {expected_version + 1}, not {current}")


# A list column's encoding: SQLite stores JSON text, PostgreSQL a text[] array.
ListEncoding = Callable[[Sequence[str]], object]


def user_to_row(user: User, encode_list: ListEncoding) -> tuple[object, ...]:
    """A row of USER_COLUMNS for `user`."""
    return (
        user.user_id,
        user.username,
        user.account_id,
        encode_list(user.roles),
        user.password_hash,
        user.create_time_us,
        user.totp_seed,
        user.totp_pending_seed,
        user.version,
    )


def key_to_row(key: ApiKey, encode_list: ListEncoding) -> tuple[object, ...]:
    """A row of API_KEY_COLUMNS for `key` (scopes sorted)."""
    return (
        key.key_id,
        key.user_id,
        key.account_id,
        key.kind.value,
        encode_list(sorted(key.scopes)),
        encode_list(key.ip_allow_list),
        key.tier,
        key.create_time_us,
        key.expire_time_us,
        key.secret,
        key.public_key,
        key.previous_secret,
        key.previous_public_key,
        key.previous_expire_time_us,
        key.revoke_time_us,
        key.label,
        key.version,
    )


def user_update_params(user: User, expected_version: int, encode_list: ListEncoding) -> tuple[object, ...]:
    """The parameters of a user's compare-and-swap update, in its SQL's order: roles, password hash, TOTP seeds,
    the new version, then the user id and `expected_version` of its WHERE clause (the version is checked)."""
    check_next_version(user.version, expected_version, "user")
    return (
        encode_list(user.roles),
        user.password_hash,
        user.totp_seed,
        user.totp_pending_seed,
        user.version,
        user.user_id,
        expected_version,
    )


def key_update_params(key: ApiKey, expected_version: int, encode_list: ListEncoding) -> tuple[object, ...]:
    """The parameters of an API key's compare-and-swap update, in its SQL's order: scopes (sorted), expiry,
    current and previous secrets, revocation, the new version, then the key id and `expected_version` of its
    WHERE clause (the version is checked)."""
    check_next_version(key.version, expected_version, "API key")
    return (
        encode_list(sorted(key.scopes)),
        key.expire_time_us,
        key.secret,
        key.public_key,
        key.previous_secret,
        key.previous_public_key,
        key.previous_expire_time_us,
        key.revoke_time_us,
        key.version,
        key.key_id,
        expected_version,
    )


def refresh_to_row(token: RefreshToken, encode_list: ListEncoding) -> tuple[object, ...]:
    """A row of REFRESH_COLUMNS for `token`."""
    return (
        token.token_hash,
        token.family_id,
        token.user_id,
        token.issue_time_us,
        token.expire_time_us,
        encode_list(token.amr),
        token.cnf_thumbprint,
        token.used_time_us,
        token.revoke_time_us,
    )
