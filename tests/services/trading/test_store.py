"""The OrderStore contract, run against real SQLite and real PostgreSQL (see conftest.py)."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from services.trading.core import (
    Order,
    OrderStatus,
    OrderType,
    PageCursor,
    TimeInForce,
    TradingCore,
)
from services.trading.errors import AlreadyExists, FailedPrecondition, NotFound
from services.trading.store_postgres import PostgresOrderStore


async def test_insert_get_round_trip(store, make_order):
    order = make_order(quantity=Decimal("1.50000000"), price=Decimal("123.4500"))
    stored, created = await store.insert_if_absent(order)
    assert created
    assert stored == order
    assert str(stored.quantity) == "1.5" and str(stored.price) == "123.45"
    assert await store.get("acct-1", order.order_id) == order
    assert await store.get("acct-1", "ord_00000000000000000000000099") is None
    assert await store.get("acct-2", order.order_id) is None  # another account never sees it


async def test_market_order_without_price(store, make_order):
    order = make_order(type=OrderType.MARKET, time_in_force=TimeInForce.IOC, price=None)
    await store.insert_if_absent(order)
    assert (await store.get("acct-1", order.order_id)) == order


async def test_insert_if_absent_returns_existing(store, make_order):
    first = make_order()
    await store.insert_if_absent(first)
    second = make_order(order_id="ord_00000000000000000000000002", quantity=Decimal("7"))
    stored, created = await store.insert_if_absent(second)
    assert not created
    assert stored == first
    assert await store.get("acct-1", second.order_id) is None
    # The same client_order_id in another account is a different order.
    other = make_order(order_id="ord_00000000000000000000000003", account_id="acct-2")
    assert (await store.insert_if_absent(other))[1]


async def test_transition(backend, store, make_order):
    order = make_order()
    await store.insert_if_absent(order)
    assert await store.transition("acct-2", order.order_id, OrderStatus.OPEN, OrderStatus.CANCELED, 5) is None
    updated = await store.transition(
        "acct-1", order.order_id, OrderStatus.OPEN, OrderStatus.CANCELED, order.create_time_us + 10
    )
    assert updated is not None
    assert updated.status is OrderStatus.CANCELED
    assert updated.update_time_us == order.create_time_us + 10
    assert updated.create_time_us == order.create_time_us
    # Not OPEN any more: a second OPEN -> CANCELED does nothing.
    assert (
        await store.transition("acct-1", order.order_id, OrderStatus.OPEN, OrderStatus.CANCELED, 99) is None
    )
    assert await store.get("acct-1", order.order_id) == updated
    assert await store.transition("acct-1", "ord_00000000000000000000000099", OrderStatus.OPEN,
                                  OrderStatus.CANCELED, 1) is None  # fmt: skip
    assert backend.count("order_events") == 2  # OPEN, then CANCELED


async def test_list_pages_newest_first(store, make_order):
    orders: list[Order] = []
    for i in range(11):
        order = make_order(
            order_id=f"ord_{i:026d}",
            client_order_id=f"c-{i}",
            create_time_us=1_000 + i // 3,  # ties in time, broken by order_id
            update_time_us=1_000 + i // 3,
        )
        await store.insert_if_absent(order)
        orders.append(order)
    await store.insert_if_absent(make_order(order_id=f"ord_{99:026d}", account_id="acct-2"))
    expected = sorted(orders, key=lambda o: (o.create_time_us, o.order_id), reverse=True)

    seen: list[Order] = []
    before: PageCursor | None = None
    while True:
        page = await store.list("acct-1", 4, before)
        seen.extend(page)
        if len(page) < 4:
            break
        last = page[-1]
        before = PageCursor("acct-1", last.create_time_us, last.order_id)
    assert seen == expected
    assert await store.list("acct-3", 10, None) == []


async def test_restart_keeps_orders(backend, store, make_order):
    order = make_order()
    await store.insert_if_absent(order)
    await store.transition("acct-1", order.order_id, OrderStatus.OPEN, OrderStatus.FILLED, 42)
    await store.close()
    reopened = await backend.open()
    got = await reopened.get("acct-1", order.order_id)
    assert got is not None and got.status is OrderStatus.FILLED and got.update_time_us == 42
    assert (await reopened.insert_if_absent(make_order(order_id="ord_00000000000000000000000002")))[
        1
    ] is False


async def test_closed_store_refuses_work(store, make_order):
    await store.close()
    with pytest.raises(Exception):
        await store.get("acct-1", make_order().order_id)


def _install_failing_event_trigger(backend) -> None:
    if backend.kind == "sqlite":
        backend.execute(
            "CREATE TRIGGER fail_events BEFORE INSERT ON order_events BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
    else:
        backend.execute(
            "CREATE FUNCTION {schema}.boom() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$"
        )
        backend.execute(
            "CREATE TRIGGER fail_events BEFORE INSERT ON {schema}.order_events "
            "FOR EACH ROW EXECUTE FUNCTION {schema}.boom()"
        )


def _drop_failing_event_trigger(backend) -> None:
    if backend.kind == "sqlite":
        backend.execute("DROP TRIGGER fail_events")
    else:
        backend.execute("DROP TRIGGER fail_events ON {schema}.order_events")


async def test_error_mid_write_leaves_nothing_half_written(backend, store, make_order):
    """The order row is written first, its event second; when the second fails the first is rolled back."""
    kept = make_order(order_id="ord_00000000000000000000000001", client_order_id="kept")
    await store.insert_if_absent(kept)
    _install_failing_event_trigger(backend)

    lost = make_order(order_id="ord_00000000000000000000000002", client_order_id="lost")
    with pytest.raises(Exception, match="boom"):
        await store.insert_if_absent(lost)
    with pytest.raises(Exception, match="boom"):
        await store.transition("acct-1", kept.order_id, OrderStatus.OPEN, OrderStatus.CANCELED, 7)

    assert await store.get("acct-1", lost.order_id) is None
    assert await store.get("acct-1", kept.order_id) == kept  # still OPEN: the update was rolled back
    assert backend.count("orders") == 1
    assert backend.count("order_events") == 1

    # The store is still usable afterwards (no transaction left open on its connection).
    _drop_failing_event_trigger(backend)
    assert (await store.insert_if_absent(lost))[1]
    assert await store.transition("acct-1", kept.order_id, OrderStatus.OPEN, OrderStatus.CANCELED, 7)
    assert backend.count("order_events") == 3


async def test_rejects_invalid_rows(backend, store, make_order):
    with pytest.raises(Exception):
        await store.insert_if_absent(make_order(status=OrderStatus.UNSPECIFIED))
    assert backend.count("orders") == 0
    # A duplicate order_id (another client_order_id) is an error, not a silent no-op.
    await store.insert_if_absent(make_order())
    with pytest.raises(Exception):
        await store.insert_if_absent(make_order(client_order_id="other"))
    assert backend.count("orders") == 1


# --- the core over each real store ---------------------------------------------------------------------


async def test_concurrent_identical_places_create_one_order(store, clock, ids, make_new):
    core = TradingCore(store, clock_us=clock, new_order_id=ids)
    results = await asyncio.gather(*(core.place(make_new()) for _ in range(50)))
    order_ids = {order.order_id for order, _ in results}
    assert len(order_ids) == 1
    assert sum(1 for _, replayed in results if not replayed) == 1
    assert len(await store.list("acct-1", 100, None)) == 1


async def test_concurrent_places_through_two_stores_create_one_order(
    backend, clock, make_new, sequential_ids
):
    """Two stores (two connections or pools) on one database: the database, not a lock in Python, decides."""
    first, second = await backend.open(), await backend.open()
    core_a = TradingCore(first, clock_us=clock, new_order_id=sequential_ids("A"))
    core_b = TradingCore(second, clock_us=clock, new_order_id=sequential_ids("B"))
    calls = [core.place(make_new()) for _ in range(25) for core in (core_a, core_b)]
    results = await asyncio.gather(*calls)
    assert len({order.order_id for order, _ in results}) == 1
    assert sum(1 for _, replayed in results if not replayed) == 1
    assert backend.count("orders") == 1


async def test_concurrent_cancels(backend, store, clock, ids, make_new):
    core = TradingCore(store, clock_us=clock, new_order_id=ids)
    order, _ = await core.place(make_new())
    clock.advance(5)
    results = await asyncio.gather(*(core.cancel("acct-1", order.order_id) for _ in range(20)))
    assert {r.status for r in results} == {OrderStatus.CANCELED}
    assert {r.update_time_us for r in results} == {order.create_time_us + 5}
    assert backend.count("order_events") == 2


async def test_reused_client_order_id_with_other_params(store, clock, ids, make_new):
    core = TradingCore(store, clock_us=clock, new_order_id=ids)
    await core.place(make_new())
    with pytest.raises(AlreadyExists) as info:
        await core.place(make_new(quantity=Decimal("2")))
    assert info.value.reason == "CLIENT_ORDER_ID_REUSED"


async def test_cross_account_is_not_found(store, clock, ids, make_new):
    core = TradingCore(store, clock_us=clock, new_order_id=ids)
    order, _ = await core.place(make_new())
    with pytest.raises(NotFound) as hidden:
        await core.get("acct-2", order.order_id)
    with pytest.raises(NotFound) as missing:
        await core.get("acct-2", "ord_00000000000000000000000099")
    assert hidden.value.message == missing.value.message
    with pytest.raises(NotFound):
        await core.cancel("acct-2", order.order_id)
    assert (await core.get("acct-1", order.order_id)).status is OrderStatus.OPEN
    await store.transition("acct-1", order.order_id, OrderStatus.OPEN, OrderStatus.FILLED, 9)
    with pytest.raises(NotFound):  # NotFound, not FailedPrecondition: nothing leaks across accounts
        await core.cancel("acct-2", order.order_id)
    with pytest.raises(FailedPrecondition):
        await core.cancel("acct-1", order.order_id)


def test_postgres_schema_name_is_validated():
    for bad in ["", "Bad", "a-b", 'x"; DROP TABLE y; --', "1abc", "a" * 64]:
        with pytest.raises(ValueError, match="schema"):
            asyncio.run(PostgresOrderStore.open("postgresql://invalid", schema=bad))


async def test_sqlite_durability_settings(backend, store):
    if backend.kind != "sqlite":
        pytest.skip("SQLite pragmas")
    assert backend.execute("PRAGMA journal_mode") == [("wal",)]
    assert backend.execute("SELECT version FROM schema_version") == [(1,)]
    conn = store._conn  # the store's own connection: synchronous=FULL (2), foreign keys on
    assert conn is not None
    pragmas = await store._run(
        lambda c: (c.execute("PRAGMA synchronous").fetchone(), c.execute("PRAGMA foreign_keys").fetchone())
    )
    assert pragmas == ((2,), (1,))
