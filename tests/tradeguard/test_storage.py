"""Database URLs: SQLite by default, PostgreSQL by configuration, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from tradeguard.settings import Env
from tradeguard.storage import database_url, sqlite_path


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
