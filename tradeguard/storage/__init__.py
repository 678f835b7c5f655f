"""Database URLs shared by every service: `sqlite:///<path>` (the embedded default) or `postgresql://…`,
and the wall clock in microseconds that stores and cores are given (MiFID II RTS 25 granularity)."""

from __future__ import annotations

import os
import time
from pathlib import Path

SQLITE = "sqlite:///"
_POSTGRES = ("postgresql://", "postgres://")


def database_url(variable: str, default_path: Path) -> str:
    """The URL in environment `variable`, or SQLite at `default_path`; anything else is refused."""
    url = os.environ.get(variable) or f"{SQLITE}{default_path}"
    if not url.startswith((SQLITE, *_POSTGRES)):
        raise ValueError(f"{variable} must start with {SQLITE} or postgresql://")
    return url


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (its directory created, owner-only), or None for PostgreSQL."""
    if not url.startswith(SQLITE):
        return None
    path = Path(url.removeprefix(SQLITE))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def clock_us() -> int:
    return time.time_ns() // 1000
