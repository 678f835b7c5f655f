"""Where the auth service's records live: the `AuthStore` protocol (SQLite embedded, PostgreSQL in production).

Every method is atomic. Methods that change a record either take the version the caller read and succeed only if
it is still current (compare-and-swap, returning False otherwise) or are conditional updates whose condition is
stated below; concurrent callers on several replicas sharing one PostgreSQL see exactly one winner.
"""

from __future__ import annotations

import builtins
from typing import Protocol

from services.auth.model import ApiKey, RefreshToken, Role, User

__all__ = ["SCHEMA_VERSION", "AuthStore"]

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
