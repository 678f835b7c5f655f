"""Database URLs: SQLite by default, PostgreSQL by configuration, nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from tradeguard.storage import database_url, sqlite_path


def test_default_is_sqlite_and_its_directory_is_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TG_TEST_DB", raising=False)
    url = database_url("TG_TEST_DB", tmp_path / "data" / "x.db")
    assert url == f"sqlite:///{tmp_path / 'data' / 'x.db'}"
    path = sqlite_path(url)
    assert path == tmp_path / "data" / "x.db"
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_postgres_by_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TG_TEST_DB", "postgresql://127.0.0.1:5432/test?user=postgres")
    url = database_url("TG_TEST_DB", tmp_path / "x.db")
    assert url.startswith("postgresql://")
    assert sqlite_path(url) is None


@pytest.mark.parametrize("bad", ["mysql://h/db", "sqlite://relative.db", "file:///x.db", "redis://127.0.0.1"])
def test_other_urls_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: str
) -> None:
    monkeypatch.setenv("TG_TEST_DB", bad)
    with pytest.raises(ValueError, match="TG_TEST_DB"):
        database_url("TG_TEST_DB", tmp_path / "x.db")
