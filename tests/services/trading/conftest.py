"""Real databases for the trading tests: SQLite in tmp_path and PostgreSQL in a fresh schema per test; the
service itself behind its guard (`trading`, overriding tests/conftest.py's), verified by the session's real auth
service (tests/conftest.py `auth_services`).

PostgreSQL comes from TRADEGUARD_TEST_PG_DSN, or the local default; when the variable is unset and the default
server is unreachable the PostgreSQL cases are skipped, when it is set they fail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.trading.model import NewOrder, Order, OrderStatus, OrderType, Side, TimeInForce
from services.trading.service import SERVICE
from services.trading.settings import Settings
from services.trading.store import OrderStore
from services.trading.store_postgres import PostgresOrderStore
from services.trading.store_sqlite import SqliteOrderStore
from tests.support import PG_DSN, AuthServices, Database, create_api_key, create_auth_user, open_database
from tradeguard.guard import Guard, GuardSettings
from tradeguard.guard.client import ApiKeyCredentials, authenticated_channel, signing_interceptors
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import ServerConfig
from tradeguard.service import start
from tradeguard.testing import FakeClock
from tradeguard.trading.v1 import trading_pb2_grpc


class Backend(Database):
    """The trading test's database; `open()` may be called again (a restart) and sees the same data."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        super().__init__(kind, tmp_path, "orders.sqlite3", "tg_test")

    async def open(self, **options: Any) -> OrderStore:
        """A store on this test's database; `options` go to the backend's `open` (e.g. max_batch=1)."""
        if self.kind == "sqlite":
            return self.opened(await SqliteOrderStore.open(self.path, **options))
        return self.opened(
            await PostgresOrderStore.open(PG_DSN, schema=self.schema, min_size=1, max_size=10, **options)
        )

    def count(self, table: str) -> int:
        return int(self.execute(f"SELECT count(*) FROM {{schema}}.{table}")[0][0])


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with open_database(Backend, request.param, tmp_path) as database:
        yield database


@pytest.fixture
async def store(backend: Backend) -> OrderStore:
    return await backend.open()


def sequential_ids(prefix: str = "") -> Callable[[], str]:
    """Deterministic, valid, increasing order ids: ord_0000...0001, ord_0000...0002, ..."""
    counter = iter(range(1, 10**9))

    def next_id() -> str:
        return f"ord_{prefix}{next(counter):0{26 - len(prefix)}d}"

    return next_id


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ids() -> Iterator[Callable[[], str]]:
    yield sequential_ids()


def make_new(**overrides: Any) -> NewOrder:
    fields: dict[str, Any] = {
        "account_id": "acct-1",
        "client_order_id": "c-1",
        "symbol": "BTC-USD",
        "side": Side.BUY,
        "type": OrderType.LIMIT,
        "time_in_force": TimeInForce.GTC,
        "quantity": Decimal("1.5"),
        "price": Decimal("100"),
    }
    fields.update(overrides)
    return NewOrder(**fields)


def make_order(**overrides: Any) -> Order:
    fields: dict[str, Any] = {
        "order_id": "ord_00000000000000000000000001",
        "account_id": "acct-1",
        "client_order_id": "c-1",
        "symbol": "BTC-USD",
        "side": Side.BUY,
        "type": OrderType.LIMIT,
        "time_in_force": TimeInForce.GTC,
        "quantity": Decimal("1.5"),
        "price": Decimal("100"),
        "status": OrderStatus.OPEN,
        "create_time_us": 1_700_000_000_000_000,
        "update_time_us": 1_700_000_000_000_000,
    }
    fields.update(overrides)
    return Order(**fields)


@pytest.fixture(name="make_new")
def make_new_fixture() -> Callable[..., NewOrder]:
    return make_new


@pytest.fixture(name="make_order")
def make_order_fixture() -> Callable[..., Order]:
    return make_order


@pytest.fixture(name="sequential_ids")
def sequential_ids_fixture() -> Callable[..., Callable[[], str]]:
    return sequential_ids


# --- the service behind its guard ---------------------------------------------------------------------------


@dataclass
class GuardedTrading:
    """The trading service behind its guard, verified by the session's real auth service (and key vault); calls
    are signed with API keys of users an operator created there for this test."""

    port: int
    paths: pki.PkiPaths
    auth: AuthServices
    keys: dict[tuple[str, str], ApiKeyCredentials] = field(default_factory=dict)  # by (account, scopes)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def api_key(self, account: str, scopes: str = "orders:read orders:write") -> ApiKeyCredentials:
        """An HMAC API key with `scopes` of a trader of `account` (made once per pair in a test)."""
        credentials = self.keys.get((account, scopes))
        if credentials is None:
            user = await create_auth_user(self.auth, account)
            credentials = self.keys[account, scopes] = await create_api_key(self.auth, user.user_id, scopes)
        return credentials

    async def channel(
        self, account: str = "acct-1", scope: str = "orders:read orders:write", caller: str = "ops"
    ) -> grpc.aio.Channel:
        """A channel whose calls are signed with an API key (holding `scope`) of a user of `account`."""
        key = await self.api_key(account, scope)
        return authenticated_channel(
            self.target, "trading", tls.Workload.of(self.paths, caller), signing_interceptors(key)
        )

    def unauthenticated(self, caller: str = "ops") -> MeshChannel:
        return MeshChannel(self.target, "trading", tls.Workload.of(self.paths, caller))

    @staticmethod
    def stub(channel: grpc.aio.Channel) -> trading_pb2_grpc.TradingServiceAsyncStub:
        return trading_pb2_grpc.TradingServiceStub(channel)


@pytest.fixture
async def trading(pki_paths: pki.PkiPaths, auth_services: AuthServices) -> AsyncIterator[GuardedTrading]:
    """Overrides tests/conftest.py's: the real trading service behind its guard, the session's real auth service
    (and key vault) verifying its callers, its rate-limit service counting their calls."""
    home = pki_paths.home
    settings = Settings(
        server=ServerConfig(name="trading", port=0, home=home, grace_s=2.0),
        database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
        # the quota stage on, as in production, at the session's rate-limit service (generous limits)
        guard=GuardSettings(
            auth_target=auth_services.auth_target,
            ratelimit_target=auth_services.ratelimit_target,
            audit_target=auth_services.audit_target,  # every call recorded, as in production
        ),
    )
    running = await start(SERVICE, settings)
    try:
        guard = running.assembly.layers[0]
        assert isinstance(guard, Guard)
        yield GuardedTrading(running.port, pki_paths, auth_services)
    finally:
        await running.stop(grace=0, drain=0)
