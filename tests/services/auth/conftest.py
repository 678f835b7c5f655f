"""Fixtures for the auth tests: real stores and real hot state, a fake clock.

- `clock`: a `FakeClock` (microseconds); the in-process hot state reads it, and so does the Redis one for its
  windows, locks and revocation expiry (Redis's own TTLs run in real time).
- `auth_db` / `auth_store`: an `AuthStore` on SQLite (a file in tmp_path) or PostgreSQL (a fresh schema on the
  machine's server, dropped after the test; skipped when unreachable, failed when TRADEGUARD_TEST_PG_DSN is set).
  `auth_db.open()` opens another store on the same database (a second replica, or a restart).
- `hot_backend` / `hot_state`: a `HotState` in process or on the machine's Redis (127.0.0.1:6379) under a prefix
  of its own; `hot_backend.open()` opens another one sharing the same state (a second replica); the test's keys
  are deleted after it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.auth.hot import HotState
from services.auth.hot_memory import MemoryHotState
from services.auth.hot_redis import RedisHotState
from services.auth.store import AuthStore
from services.auth.store_postgres import PostgresAuthStore
from services.auth.store_sqlite import SqliteAuthStore
from services.auth.vault_client import VaultClient
from services.keyvault.settings import Settings as KeyVaultSettings
from tests.support import PG_DSN, Database, open_database
from tests.support_auth import keyvault_settings, running_keyvault
from tradeguard.mesh import pki
from tradeguard.storage.redis import RedisConfig
from tradeguard.testing import FakeClock, RunningService

LOCAL_REDIS = "redis://127.0.0.1:6379?timeout=5&client_name=tg-test-auth"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class AuthDatabase(Database):
    """One test's auth database; `open()` may be called again (a second replica or a restart)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        super().__init__(kind, tmp_path, "auth.sqlite3", "tg_test_auth")

    async def open(self) -> AuthStore:
        if self.kind == "sqlite":
            return self.opened(await SqliteAuthStore.open(self.path))
        return self.opened(await PostgresAuthStore.open(PG_DSN, schema=self.schema, min_size=1, max_size=10))

    def count(self, table: str) -> int:
        return int(self.execute(f"SELECT count(*) FROM {{schema}}.{table}")[0][0])


@pytest.fixture(params=["sqlite", "postgres"])
async def auth_db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AuthDatabase]:
    async with open_database(AuthDatabase, request.param, tmp_path) as database:
        yield database


@pytest.fixture
async def auth_store(auth_db: AuthDatabase) -> AuthStore:
    return await auth_db.open()


class HotBackend:
    """One test's hot state: in process (one map set, shared by every `open()`) or under a Redis prefix of its
    own; `open()` gives another `HotState` on the same state (for Redis a second client: a second replica).
    `open(**options)` with options starts a new in-process state (a restart) with them."""

    def __init__(self, kind: str, clock: FakeClock) -> None:
        self.kind = kind
        self.clock = clock
        self.prefix = f"tg-test:auth:{secrets.token_hex(6)}:"
        self._memory: MemoryHotState | None = None
        self._open: list[HotState] = []

    async def open(self, **options: object) -> HotState:
        """A hot state on this test's state; `options` go to the backend's constructor / `open`."""
        if self.kind == "memory":
            if self._memory is None or options:
                self._memory = MemoryHotState(self.clock, **options)  # type: ignore[arg-type]
                self._open.append(self._memory)
            return self._memory
        state = await RedisHotState.open(LOCAL_REDIS, prefix=self.prefix, clock=self.clock, **options)  # type: ignore[arg-type]
        self._open.append(state)
        return state

    async def keys(self) -> list[str]:
        """The Redis keys under this test's prefix (none for the in-process backend)."""
        if self.kind != "redis":
            return []
        client = aioredis.Redis.from_url(str(RedisConfig.from_url(LOCAL_REDIS).url))
        try:
            return [k.decode() async for k in client.scan_iter(match=f"{self.prefix}*", count=1000)]
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        for state in self._open:
            await state.close()
        if self.kind == "redis":
            client = aioredis.Redis.from_url(str(RedisConfig.from_url(LOCAL_REDIS).url))
            try:
                names = [k async for k in client.scan_iter(match=f"{self.prefix}*", count=1000)]
                if names:
                    await client.delete(*names)
            finally:
                await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def hot_backend(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[HotBackend]:
    backend = HotBackend(request.param, clock)
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
async def hot_state(hot_backend: HotBackend) -> HotState:
    return await hot_backend.open()


# --- the real key vault, for the auth service's vault client (tests/services/auth/test_vault_client.py) --------
# Reconstructed: an earlier version of these two fixtures was overwritten by accident while this file was written.


@pytest.fixture
async def keyvault(pki_paths: pki.PkiPaths) -> AsyncIterator[RunningService[KeyVaultSettings, Any]]:
    """The real key vault over mutual TLS, with the auth service's keys created (as `ops`)."""
    settings = keyvault_settings(
        pki_paths.home,
        "auth test passphrase",
        key_freshness_s=0.0,  # strict: a rotated key may retire its previous version at once
    )
    async with running_keyvault(pki_paths, settings) as service:
        yield service


@pytest.fixture
async def vault(keyvault: RunningService[KeyVaultSettings, Any]) -> AsyncIterator[VaultClient]:
    """The auth service's vault client, as workload `auth`."""
    async with keyvault.channel("auth") as channel:
        yield VaultClient(channel)
