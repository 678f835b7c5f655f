"""TradingCore with a fake clock and deterministic ids, over a real SQLite store."""

from __future__ import annotations

import ast
import re
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

import pytest

import services.trading.core as core_module
from services.trading.core import TradingCore, encode_page_token, new_order_id, validate_account_and_order_id
from services.trading.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.trading.model import NewOrder, Order, OrderStatus, PageCursor
from services.trading.store_sqlite import SqliteOrderStore
from tradeguard.testing import FakeClock


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteOrderStore]:
    store = await SqliteOrderStore.open(tmp_path / "orders.sqlite3")
    yield store
    await store.close()


@pytest.fixture
def core(sqlite_store: SqliteOrderStore, clock: FakeClock, ids: Callable[[], str]) -> TradingCore:
    return TradingCore(sqlite_store, clock_us=clock, new_order_id=ids)


def _fields(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


async def test_place_and_replay(
    core: TradingCore, clock: FakeClock, make_new: Callable[..., NewOrder]
) -> None:
    order, replayed = await core.place(make_new())
    assert not replayed
    assert order.order_id == "ord_00000000000000000000000001"
    assert order.status is OrderStatus.OPEN
    assert order.create_time_us == order.update_time_us == clock.now_us
    assert order.quantity == Decimal("1.5") and order.price == Decimal("100")

    clock.advance(1_000)
    again, replayed = await core.place(make_new())
    assert replayed
    assert again == order  # the stored order, its original time, no new id consumed into the store


async def test_replay_after_cancel_returns_the_canceled_order(
    core: TradingCore, make_new: Callable[..., NewOrder]
) -> None:
    order, _ = await core.place(make_new())
    await core.cancel("acct-1", order.order_id)
    again, replayed = await core.place(make_new())
    assert replayed and again.status is OrderStatus.CANCELED


async def test_reused_client_order_id(core: TradingCore, make_new: Callable[..., NewOrder]) -> None:
    await core.place(make_new())
    for change in ({"quantity": Decimal("2")}, {"price": Decimal("101")}, {"symbol": "ETH-USD"}):
        with pytest.raises(AlreadyExists) as info:
            await core.place(make_new(**change))
        assert info.value.reason == "CLIENT_ORDER_ID_REUSED"
        assert info.value.metadata == {"client_order_id": "c-1"}


async def test_cancel(core: TradingCore, clock: FakeClock, make_new: Callable[..., NewOrder]) -> None:
    order, _ = await core.place(make_new())
    clock.advance(7)
    canceled = await core.cancel("acct-1", order.order_id)
    assert canceled.status is OrderStatus.CANCELED
    assert canceled.update_time_us == order.create_time_us + 7
    clock.advance(7)
    assert await core.cancel("acct-1", order.order_id) == canceled  # no-op, time unchanged
    assert await core.get("acct-1", order.order_id) == canceled


@pytest.mark.parametrize("final", [OrderStatus.FILLED, OrderStatus.REJECTED])
async def test_cancel_not_open(
    core: TradingCore,
    sqlite_store: SqliteOrderStore,
    make_new: Callable[..., NewOrder],
    final: OrderStatus,
) -> None:
    order, _ = await core.place(make_new())
    await sqlite_store.transition("acct-1", order.order_id, OrderStatus.OPEN, final, 1)
    with pytest.raises(FailedPrecondition) as info:
        await core.cancel("acct-1", order.order_id)
    assert info.value.reason == "ORDER_NOT_OPEN"
    assert info.value.metadata["status"] == final.name


async def test_missing_and_other_account_are_the_same_not_found(
    core: TradingCore, make_new: Callable[..., NewOrder]
) -> None:
    order, _ = await core.place(make_new())
    errors: list[tuple[str, str]] = []
    for account, order_id in [("acct-2", order.order_id), ("acct-1", "ord_00000000000000000000000077")]:
        for call in (core.get, core.cancel):
            with pytest.raises(NotFound) as info:
                await call(account, order_id)
            errors.append((info.value.message, info.value.reason))
    assert len(set(errors)) == 1


async def test_get_and_cancel_validate_ids(core: TradingCore) -> None:
    for call in (core.get, core.cancel):
        with pytest.raises(InvalidArgument) as info:
            await call("", "nope")
        assert _fields(info.value) == ["account_id", "order_id"]
        with pytest.raises(InvalidArgument) as info:
            await call("acct-1", "ord_0000000000000000000000000I")  # I is not Crockford base32
        assert _fields(info.value) == ["order_id"]


async def test_list_paging(core: TradingCore, clock: FakeClock, make_new: Callable[..., NewOrder]) -> None:
    placed: list[Order] = []
    for i in range(23):
        order, _ = await core.place(make_new(client_order_id=f"c-{i}"))
        placed.append(order)
        if i % 4 == 0:  # several orders share a microsecond
            clock.advance(1)
    await core.place(make_new(account_id="acct-2", client_order_id="x"))
    expected = sorted(placed, key=lambda o: (o.create_time_us, o.order_id), reverse=True)

    seen: list[Order] = []
    token, pages = "", 0
    while True:
        page, token = await core.list("acct-1", 5, token)
        seen.extend(page)
        pages += 1
        if not token:
            break
    assert seen == expected
    assert pages == 5  # 5+5+5+5+3: the last page carries no token

    exact, token = await core.list("acct-1", 23, "")
    assert len(exact) == 23 and token == ""


async def test_list_default_and_max_page_size(core: TradingCore, make_new: Callable[..., NewOrder]) -> None:
    for i in range(51):
        await core.place(make_new(client_order_id=f"c-{i}"))
    page, token = await core.list("acct-1", 0, "")
    assert len(page) == 50 and token
    rest, token = await core.list("acct-1", 500, token)
    assert len(rest) == 1 and token == ""


@pytest.mark.parametrize("size", [-1, 501, 2**31 - 1])
async def test_list_rejects_page_size(core: TradingCore, size: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        await core.list("acct-1", size, "")
    assert _fields(info.value) == ["page_size"]


async def test_list_rejects_foreign_and_garbage_tokens(
    core: TradingCore, make_new: Callable[..., NewOrder]
) -> None:
    for i in range(3):
        await core.place(make_new(client_order_id=f"c-{i}"))
    _, token = await core.list("acct-1", 1, "")
    assert token
    for bad in [token + "A", token[:-1], "garbage", "!!!", "e30", "W10"]:
        with pytest.raises(InvalidArgument) as info:
            await core.list("acct-1", 1, bad)
        assert _fields(info.value) == ["page_token"]
    with pytest.raises(InvalidArgument) as info:
        await core.list("acct-2", 1, token)
    assert _fields(info.value) == ["page_token"]
    forged = encode_page_token(PageCursor("acct-2", 1, "ord_00000000000000000000000001"))
    with pytest.raises(InvalidArgument):
        await core.list("acct-1", 1, forged)


async def test_list_reports_all_violations(core: TradingCore) -> None:
    with pytest.raises(InvalidArgument) as info:
        await core.list("", 501, "")
    assert _fields(info.value) == ["account_id", "page_size"]


def test_new_order_id_format_and_order() -> None:
    pattern = re.compile(r"ord_[0-9A-HJKMNP-TV-Z]{26}")
    ids = [new_order_id(now_ms=ms) for ms in (1, 2, 10**12, 2**48 - 1)]
    for order_id in ids:
        assert pattern.fullmatch(order_id)
        validate_account_and_order_id("acct-1", order_id)
    assert ids == sorted(ids)
    assert new_order_id(now_ms=0).startswith("ord_0000000000")
    many = {new_order_id() for _ in range(2000)}
    assert len(many) == 2000


def test_core_imports_no_grpc_or_protobuf() -> None:
    tree = ast.parse(Path(core_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {name for name in imported if name.startswith(("grpc", "google.protobuf"))}


# --- whose orders ---------------------------------------------------------------------------------------------


def test_a_call_acts_only_for_its_principals_account() -> None:
    from services.trading.core import account_of
    from tradeguard.errors import PermissionDenied, Unauthenticated
    from tradeguard.principal import Principal

    alice = Principal(user_id="usr_a", account_id="acct-a", scopes=frozenset({"orders:read"}))
    assert account_of(alice, "acct-a") == "acct-a"
    assert account_of(alice, "") == "acct-a"  # empty: the caller's own
    with pytest.raises(PermissionDenied) as denied:
        account_of(alice, "acct-b")
    assert denied.value.reason == "ACCOUNT_NOT_ALLOWED"
    with pytest.raises(Unauthenticated):
        account_of(None, "acct-a")  # never for nobody, whatever the request names
