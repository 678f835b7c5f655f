"""Storage for every service: database URLs (`sqlite:///<path>`, the embedded default, or `postgresql://…`),
`open_store` (the backend a URL names), and the wall clock in microseconds that stores and cores are given
(MiFID II RTS 25 granularity).

The package: `migrations` (ordered schema steps, one transaction, a newer schema refused), `sqlite` (the
embedded connection and `SqliteWorker`, one thread per database), `postgres` (the pool and its migrations), and
`redis` (connections from a URL, scripts, cluster; import it only where Redis is used).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from tradeguard.settings import Env, SettingsError

__all__ = ["SQLITE", "clock_us", "database_url", "open_store", "sqlite_path"]

S = TypeVar("S")

SQLITE = "sqlite:///"
_POSTGRES = ("postgresql://", "postgres://")


def database_url(env: Env, default_path: Path) -> str:
    """The URL in `<prefix>_DATABASE_URL`, or SQLite at `default_path`; anything else is refused (SettingsError
    naming the variable, never the URL: a DSN may carry a password)."""
    url = env.text("DATABASE_URL", f"{SQLITE}{default_path}")
    if not url.startswith((SQLITE, *_POSTGRES)):
        raise SettingsError(f"{env.name('DATABASE_URL')} must start with {SQLITE} or postgresql://")
    return url


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (its directory created, owner-only), or None for PostgreSQL."""
    if not url.startswith(SQLITE):
        return None
    path = Path(url.removeprefix(SQLITE))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


async def open_store(
    url: str,
    *,
    sqlite: Callable[[Path], Awaitable[S]],
    postgres: Callable[[str], Awaitable[S]],
) -> S:
    """The store a database URL names: `sqlite(path)` for `sqlite:///<path>` (its directory created owner-only),
    `postgres(url)` for `postgresql://…` / `postgres://…`; any other URL is refused with ValueError (never a
    silent default). For example `await open_store(url, sqlite=SqliteOrderStore.open,
    postgres=PostgresOrderStore.open)`."""
    path = sqlite_path(url)
    if path is not None:
        return await sqlite(path)
    if url.startswith(_POSTGRES):
        return await postgres(url)
    raise ValueError(f"unsupported database URL scheme in {_scheme(url)!r}: use {SQLITE} or postgresql://")


def _scheme(url: str) -> str:
    """The scheme of a URL only: a DSN may carry a password, which never goes into an error message."""
    return url.split(":", 1)[0] + ":" if ":" in url else "(none)"


def clock_us() -> int:
    return time.time_ns() // 1000
