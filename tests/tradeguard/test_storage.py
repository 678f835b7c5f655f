"""Database URLs: SQLite by default, PostgreSQL by configuration, nothing else; `open_store` picks the backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tradeguard.settings import Env
from tradeguard.storage import database_url, open_store, sqlite_path
from tradeguard.storage.migrations import Migration
from tradeguard.storage.sqlite import SqliteWorker


def test_default_is_sqlite_and_its_directory_is_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database_url(Env("TG_TEST", {}), tmp_path / "data" / "x.db")
    assert url == f"sqlite:///{tmp_path / 'data' / 'x.db'}"
    path = sqlite_path(url)
    assert path == tmp_path / "data" / "x.db"
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_postgres_by_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = Env("TG_TEST", {"TG_TEST_DATABASE_URL": "postgresql://127.0.0.1:5432/test?user=postgres"})
    url = database_url(env, tmp_path / "x.db")
    assert url.startswith("postgresql://")
    assert sqlite_path(url) is None


@pytest.mark.parametrize("bad", ["mysql://h/db", "sqlite://relative.db", "file:///x.db", "redis://127.0.0.1"])
def test_other_urls_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: str
) -> None:
    with pytest.raises(ValueError, match="TG_TEST_DATABASE_URL must start with") as refused:
        database_url(Env("TG_TEST", {"TG_TEST_DATABASE_URL": bad}), tmp_path / "x.db")
    assert bad not in str(refused.value)


class Opened:
    """What `open_store` called: which backend, with what."""

    def __init__(self, backend: str, where: object) -> None:
        self.backend = backend
        self.where = where


async def _sqlite(path: Path) -> Opened:
    return Opened("sqlite", path)


async def _postgres(url: str) -> Opened:
    return Opened("postgres", url)


async def test_open_store_picks_the_backend_by_url(tmp_path: Path) -> None:
    sqlite = await open_store(f"sqlite:///{tmp_path / 'new' / 'x.db'}", sqlite=_sqlite, postgres=_postgres)
    assert (sqlite.backend, sqlite.where) == ("sqlite", tmp_path / "new" / "x.db")
    assert ((tmp_path / "new").stat().st_mode & 0o777) == 0o700  # its directory made, owner-only
    for url in ("postgresql://db.internal/tg", "postgres://db.internal/tg"):
        postgres = await open_store(url, sqlite=_sqlite, postgres=_postgres)
        assert (postgres.backend, postgres.where) == ("postgres", url)


@pytest.mark.parametrize(
    "bad", ["mysql://u:hunter2@h/db", "sqlite://relative.db", "redis://:hunter2@h", "x.db"]
)
async def test_open_store_refuses_other_urls_without_showing_a_password(bad: str) -> None:
    with pytest.raises(ValueError, match="unsupported database URL") as refused:
        await open_store(bad, sqlite=_sqlite, postgres=_postgres)
    assert "hunter2" not in str(refused.value)


async def test_open_store_with_a_real_store(tmp_path: Path) -> None:
    """The store's own `open` is the factory: here the kit's SQLite worker, on a real file."""
    steps = (Migration(1, "t", ["CREATE TABLE t (x INTEGER)"]),)

    async def sqlite(path: Path) -> SqliteWorker:
        return await SqliteWorker.open(path, steps)

    async def postgres(url: str) -> SqliteWorker:
        raise AssertionError("not a PostgreSQL URL")

    worker = await open_store(f"sqlite:///{tmp_path / 'w.db'}", sqlite=sqlite, postgres=postgres)
    try:
        assert await worker.run(lambda c: c.execute("SELECT version FROM schema_version").fetchall()) == [
            (1,)
        ]
    finally:
        await worker.close()
