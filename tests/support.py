"""Helpers the tests share (fixtures live in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg
import pytest
import redis
from psycopg import sql

from tradeguard.mesh import pki
from tradeguard.testing import eventually


def free_port() -> int:
    """A loopback port free at the time of asking (for servers that a test starts as a process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def openssl_handshake(port: int, paths: pki.PkiPaths, name: str, version: str) -> str:
    """`openssl s_client -<version>` (tls1_2 / tls1_3) presenting NAME's certificate; the combined output.

    A refused handshake exits non-zero; the caller reads the negotiated "Protocol version" (or its absence)."""
    cert, key, ca = str(paths.cert(name)), str(paths.key(name)), str(paths.ca_bundle)
    identity = ["-cert", cert, "-cert_chain", cert, "-key", key, "-CAfile", ca]
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-brief", f"-{version}", *identity],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return out.stdout + out.stderr


# --- PostgreSQL: the machine's real server; each test works in a schema of its own -------------------------

DEFAULT_PG_DSN = "postgresql://127.0.0.1:5432/test?user=postgres"
PG_DSN = os.environ.get("TRADEGUARD_TEST_PG_DSN") or DEFAULT_PG_DSN


@functools.cache
def _pg_unreachable() -> str:
    """Empty when PostgreSQL answers, else why not (checked once per session)."""
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as error:
        return f"PostgreSQL at {PG_DSN} unreachable: {error}"
    return ""


def require_pg() -> None:
    """Skip when PostgreSQL is unreachable on a developer's machine; fail when TRADEGUARD_TEST_PG_DSN is set
    (CI sets it, so the PostgreSQL tests can never be silently skipped there)."""
    reason = _pg_unreachable()
    if reason:
        if os.environ.get("TRADEGUARD_TEST_PG_DSN"):
            pytest.fail(reason)
        pytest.skip(reason)


def drop_pg_schema(schema: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as pg:
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


class _Closable(Protocol):
    async def close(self) -> None: ...


S = TypeVar("S", bound=_Closable)
B = TypeVar("B", bound="Database")


class Database:
    """One test's database: a SQLite file in tmp_path or a fresh PostgreSQL schema. A service's fixture subclasses
    it with an `open()` of its store (which may be called again, a restart, and sees the same data)."""

    def __init__(self, kind: str, tmp_path: Path, sqlite_name: str, schema_prefix: str) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.path = tmp_path / sqlite_name
        self.schema = f"{schema_prefix}_{secrets.token_hex(6)}"
        self._open: list[_Closable] = []

    def opened(self, store: S) -> S:
        """Register a store this database opened, so that `aclose` closes it."""
        self._open.append(store)
        return store

    def execute(self, statement: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Raw SQL outside the store: `{schema}.` names the test schema (PostgreSQL) and `%s` the parameters."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                return conn.execute(statement.replace("{schema}.", "").replace("%s", "?"), params).fetchall()
            finally:
                conn.close()
        with psycopg.connect(PG_DSN, autocommit=True) as pg:
            query = sql.SQL(statement).format(schema=sql.Identifier(self.schema))
            cur = pg.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    async def aclose(self) -> None:
        for store in self._open:
            await store.close()
        if self.kind == "postgres":
            drop_pg_schema(self.schema)


@contextlib.asynccontextmanager
async def open_database(make: Callable[[str, Path], B], kind: str, tmp_path: Path) -> AsyncIterator[B]:
    """The body of a `backend` fixture parametrised over sqlite and postgres: PostgreSQL checked first (skip or
    fail, see `require_pg`), every store closed and the schema dropped after the test."""
    if kind == "postgres":
        require_pg()
    database = make(kind, tmp_path)
    try:
        yield database
    finally:
        await database.aclose()


# --- Redis: servers a test starts itself (the machine's own Redis is at 127.0.0.1:6379) ---------------------


@dataclass
class RedisServer:
    """One `redis-server` process on a loopback port, started by a test and stopped by it."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def answers(self, **options: Any) -> bool:
        """PING answered (options go to redis.Redis: ssl settings for a TLS-only server); a server that exited
        fails the test at once, with the end of its log."""
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else "(no log)"
            raise AssertionError(
                f"redis-server on port {self.port} exited ({self.process.returncode}): {tail}"
            )
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, **options) as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(directory: Path, *args: str, port: int | None = None, tls: bool = False) -> RedisServer:
    """Start `redis-server` on 127.0.0.1 (`port`, or a free one; with `tls` it is the TLS port and there is no
    plain one, and `args` must give the certificates) with no persistence, plus `args`; the caller waits until
    it `answers` and always calls `stop`."""
    port = free_port() if port is None else port
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"redis-{port}.log"
    ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
    command = ["redis-server", "--bind", "127.0.0.1", *ports, "--dir", str(directory)]
    command += ["--save", "", "--appendonly", "no", "--logfile", str(log), *args]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return RedisServer(port, process, log)


def free_cluster_port() -> int:
    """A free loopback port for a cluster node: at most 55535, with its cluster bus port (+10000) free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextlib.asynccontextmanager
async def redis_cluster(directory: Path, nodes: int = 3) -> AsyncIterator[list[RedisServer]]:
    """A real Redis Cluster of `nodes` primaries on free loopback ports, `cluster_state:ok` on every node before
    it is yielded; every server stopped afterwards."""
    servers: list[RedisServer] = []
    try:
        for _ in range(nodes):
            port = free_cluster_port()
            servers.append(
                start_redis(
                    directory,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    port=port,
                )
            )
        await eventually(lambda: all(server.answers() for server in servers), within_s=30)
        create = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers)]
        create += ["--cluster-replicas", "0", "--cluster-yes"]
        done = await asyncio.to_thread(subprocess.run, create, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")

        def cluster_ok() -> bool:
            for server in servers:
                try:
                    with redis.Redis(port=server.port, socket_timeout=0.5) as r:
                        if r.cluster("INFO").get("cluster_state") != "ok":
                            return False
                except (redis.RedisError, OSError):
                    return False
            return True

        await eventually(cluster_ok, within_s=30)
        yield servers
    finally:
        for server in servers:
            server.stop()
