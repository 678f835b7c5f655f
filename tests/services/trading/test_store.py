"""The OrderStore contract, run against real SQLite and real PostgreSQL (see conftest.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from services.trading import store_postgres, store_sqlite
from services.trading.core import TradingCore
from services.trading.errors import AlreadyExists, FailedPrecondition, NotFound
from services.trading.model import (
    Admission,
    KillScope,
    KillSwitch,
    NewOrder,
    Order,
    OrderStatus,
    OrderType,
    PageCursor,
    TimeInForce,
)
from services.trading.store import SCHEMA_VERSION, OrderStore
from services.trading.store_postgres import PostgresOrderStore
from services.trading.store_sqlite import SqliteOrderStore
from tests.support import PG_DSN
from tradeguard.storage.migrations import SchemaTooNew, latest_version
from tradeguard.storage.postgres import open_pool
from tradeguard.storage.sqlite import SqliteWorker
from tradeguard.testing import FakeClock, eventually

from .conftest import Backend

T = TypeVar("T")


async def test_insert_get_round_trip(store: OrderStore, make_order: Callable[..., Order]) -> None:
    order = make_order(quantity=Decimal("1.50000000"), price=Decimal("123.4500"))
    stored, created = await store.insert_if_absent(order)
    assert created
    assert stored == order
    assert str(stored.quantity) == "1.5" and str(stored.price) == "123.45"
    assert await store.get("acct-1", order.order_id) == order
    assert await store.get("acct-1", "ord_00000000000000000000000099") is None
    assert await store.get("acct-2", order.order_id) is None  # another account never sees it


async def test_market_order_without_price(store: OrderStore, make_order: Callable[..., Order]) -> None:
    order = make_order(type=OrderType.MARKET, time_in_force=TimeInForce.IOC, price=None)
    await store.insert_if_absent(order)
    assert (await store.get("acct-1", order.order_id)) == order


async def test_insert_if_absent_returns_existing(store: OrderStore, make_order: Callable[..., Order]) -> None:
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


async def test_transition(backend: Backend, store: OrderStore, make_order: Callable[..., Order]) -> None:
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


async def test_list_pages_newest_first(store: OrderStore, make_order: Callable[..., Order]) -> None:
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


async def test_restart_keeps_orders(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
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


async def test_closed_store_refuses_work(store: OrderStore, make_order: Callable[..., Order]) -> None:
    await store.close()
    with pytest.raises(Exception):
        await store.get("acct-1", make_order().order_id)


def _install_failing_event_trigger(backend: Backend) -> None:
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


def _drop_failing_event_trigger(backend: Backend) -> None:
    if backend.kind == "sqlite":
        backend.execute("DROP TRIGGER fail_events")
    else:
        backend.execute("DROP TRIGGER fail_events ON {schema}.order_events")


async def test_error_mid_write_leaves_nothing_half_written(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
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


async def test_rejects_invalid_rows(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    with pytest.raises(Exception):
        await store.insert_if_absent(make_order(status=OrderStatus.UNSPECIFIED))
    assert backend.count("orders") == 0
    # A duplicate order_id (another client_order_id) is an error, not a silent no-op.
    await store.insert_if_absent(make_order())
    with pytest.raises(Exception):
        await store.insert_if_absent(make_order(client_order_id="other"))
    assert backend.count("orders") == 1


# --- the core over each real store ---------------------------------------------------------------------


async def test_concurrent_identical_places_create_one_order(
    store: OrderStore, clock: FakeClock, ids: Callable[[], str], make_new: Callable[..., NewOrder]
) -> None:
    core = TradingCore(store, clock_us=clock, new_order_id=ids)
    results = await asyncio.gather(*(core.place(make_new()) for _ in range(50)))
    order_ids = {order.order_id for order, _ in results}
    assert len(order_ids) == 1
    assert sum(1 for _, replayed in results if not replayed) == 1
    assert len(await store.list("acct-1", 100, None)) == 1


async def test_concurrent_places_through_two_stores_create_one_order(
    backend: Backend,
    clock: FakeClock,
    make_new: Callable[..., NewOrder],
    sequential_ids: Callable[..., Callable[[], str]],
) -> None:
    """Two stores (two connections or pools) on one database: the database, not a lock in Python, decides."""
    first, second = await backend.open(), await backend.open()
    core_a = TradingCore(first, clock_us=clock, new_order_id=sequential_ids("A"))
    core_b = TradingCore(second, clock_us=clock, new_order_id=sequential_ids("B"))
    calls = [core.place(make_new()) for _ in range(25) for core in (core_a, core_b)]
    results = await asyncio.gather(*calls)
    assert len({order.order_id for order, _ in results}) == 1
    assert sum(1 for _, replayed in results if not replayed) == 1
    assert backend.count("orders") == 1


async def test_concurrent_cancels(
    backend: Backend,
    store: OrderStore,
    clock: FakeClock,
    ids: Callable[[], str],
    make_new: Callable[..., NewOrder],
) -> None:
    core = TradingCore(store, clock_us=clock, new_order_id=ids)
    order, _ = await core.place(make_new())
    clock.advance(5)
    results = await asyncio.gather(*(core.cancel("acct-1", order.order_id) for _ in range(20)))
    assert {r.status for r in results} == {OrderStatus.CANCELED}
    assert {r.update_time_us for r in results} == {order.create_time_us + 5}
    assert backend.count("order_events") == 2


async def test_reused_client_order_id_with_other_params(
    store: OrderStore, clock: FakeClock, ids: Callable[[], str], make_new: Callable[..., NewOrder]
) -> None:
    core = TradingCore(store, clock_us=clock, new_order_id=ids)
    await core.place(make_new())
    with pytest.raises(AlreadyExists) as info:
        await core.place(make_new(quantity=Decimal("2")))
    assert info.value.reason == "CLIENT_ORDER_ID_REUSED"


async def test_cross_account_is_not_found(
    store: OrderStore, clock: FakeClock, ids: Callable[[], str], make_new: Callable[..., NewOrder]
) -> None:
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


def test_postgres_schema_name_is_validated() -> None:
    for bad in ["", "Bad", "a-b", 'x"; DROP TABLE y; --', "1abc", "a" * 64]:
        with pytest.raises(ValueError, match="schema"):
            asyncio.run(PostgresOrderStore.open("postgresql://invalid", schema=bad))


def test_both_backends_migrate_to_the_schema_version() -> None:
    assert (
        latest_version(store_sqlite.MIGRATIONS) == latest_version(store_postgres.MIGRATIONS) == SCHEMA_VERSION
    )


async def test_a_v1_database_is_recognised_and_keeps_its_orders(
    backend: Backend, make_order: Callable[..., Order]
) -> None:
    """Databases written before migrations existed recorded `schema_version` 1: opened as they are, not recreated,
    and migrated forward (v2: the pre-trade controls); their orders stay, with no notional and no API key."""
    if backend.kind == "sqlite":
        worker = await SqliteWorker.open(backend.path, store_sqlite.MIGRATIONS[:1], name="v1")
        await worker.close()
    else:
        pool = await open_pool(PG_DSN, backend.schema, store_postgres.MIGRATIONS[:1], min_size=1, max_size=1)
        await pool.close()
    assert backend.execute("SELECT version FROM {schema}.schema_version") == [(1,)]
    order = make_order()
    backend.execute(
        "INSERT INTO {schema}.orders (order_id, account_id, client_order_id, symbol, side, type, time_in_force, "
        "quantity, price, status, create_time_us, update_time_us) VALUES "
        "(%s, %s, %s, %s, 1, 1, 1, '1.5', '100', 1, %s, %s)",
        (
            order.order_id,
            order.account_id,
            order.client_order_id,
            order.symbol,
            order.create_time_us,
            order.update_time_us,
        ),
    )
    reopened = await backend.open()
    assert await reopened.get("acct-1", order.order_id) == order
    assert backend.execute("SELECT version FROM {schema}.schema_version ORDER BY version") == [
        (1,),
        (2,),
        (3,),
    ]
    assert backend.execute("SELECT notional, api_key_id FROM {schema}.orders") == [(None, "")]
    assert (await reopened.controls()).version == 0


async def test_a_newer_schema_is_refused(backend: Backend) -> None:
    await (await backend.open()).close()
    backend.execute("INSERT INTO {schema}.schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="newer than this code"):
        await backend.open()


async def test_sqlite_durability_settings(backend: Backend, store: OrderStore) -> None:
    if backend.kind != "sqlite":
        pytest.skip("SQLite pragmas")
    assert isinstance(store, SqliteOrderStore)
    assert backend.execute("PRAGMA journal_mode") == [("wal",)]
    assert backend.execute("SELECT version FROM schema_version ORDER BY version") == [(1,), (2,), (3,)]
    # the store's own connection: synchronous=FULL (2), foreign keys on
    pragmas = await store.worker.run(
        lambda c: (c.execute("PRAGMA synchronous").fetchone(), c.execute("PRAGMA foreign_keys").fetchone())
    )
    assert pragmas == ((2,), (1,))


# --- group commit in both stores ------------------------------------------------------------------------
# Concurrent writes share transactions (the kit's Batcher over the backend's write_batch), each write succeeds
# or fails on its own, and nothing is acknowledged before the COMMIT that includes it. Writes started in one
# event-loop turn while the store is idle go together in the next transaction, so an `asyncio.gather` of writes
# is one batch (asserted through the store's `transactions` / `writes` counters).


def oid(i: int) -> str:
    return f"ord_{i:026d}"


def orders(make_order: Callable[..., Order], n: int, start: int = 1) -> list[Order]:
    return [make_order(order_id=oid(i), client_order_id=f"c-{i}") for i in range(start, start + n)]


async def settle(*calls: Awaitable[T]) -> list[T | BaseException]:
    return await asyncio.gather(*calls, return_exceptions=True)


def _install_write_failure(backend: Backend, order_id: str) -> None:
    """The event row of `order_id` fails to insert (after its order row was written): that write must fail."""
    if backend.kind == "sqlite":
        backend.execute(
            "CREATE TRIGGER fail_one BEFORE INSERT ON order_events "
            f"WHEN NEW.order_id = '{order_id}' BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
    else:
        backend.execute(
            "CREATE FUNCTION {schema}.boom() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$"
        )
        backend.execute(
            "CREATE TRIGGER fail_one BEFORE INSERT ON {schema}.order_events "
            f"FOR EACH ROW WHEN (NEW.order_id = '{order_id}') EXECUTE FUNCTION {{schema}}.boom()"
        )


def _install_commit_failure(backend: Backend) -> None:
    """Inserting client_order_id 'poison' succeeds as a statement but makes the COMMIT fail (a deferred check)."""
    if backend.kind == "sqlite":
        backend.execute(
            "CREATE TABLE commit_guard (ref TEXT REFERENCES orders (order_id) DEFERRABLE INITIALLY DEFERRED)"
        )
        backend.execute(
            "CREATE TRIGGER poison AFTER INSERT ON orders WHEN NEW.client_order_id = 'poison' "
            "BEGIN INSERT INTO commit_guard VALUES ('no-such-order'); END"
        )
    else:
        backend.execute(
            "CREATE FUNCTION {schema}.boom() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'boom at commit'; END $$"
        )
        backend.execute(
            "CREATE CONSTRAINT TRIGGER poison AFTER INSERT ON {schema}.orders DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW WHEN (NEW.client_order_id = 'poison') EXECUTE FUNCTION {schema}.boom()"
        )


async def test_lone_write_is_its_own_transaction(store: OrderStore, make_order: Callable[..., Order]) -> None:
    assert isinstance(store, SqliteOrderStore | PostgresOrderStore)  # the group-commit counters are theirs
    assert (await store.insert_if_absent(make_order()))[1]
    assert (store.transactions, store.writes) == (1, 1)


async def test_concurrent_writes_share_transactions_and_survive_restart(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    assert isinstance(store, SqliteOrderStore | PostgresOrderStore)  # the group-commit counters are theirs
    batch = orders(make_order, 600)
    results = await asyncio.gather(*(store.insert_if_absent(order) for order in batch))
    assert all(created for _, created in results)
    assert [stored for stored, _ in results] == batch
    assert store.writes == 600
    assert store.transactions < 600 // 100  # batches of up to 256: three here
    assert store.group.largest_batch == store.group.max_batch == 256

    # Closed-loop callers (each placing again as soon as its last order is acknowledged) also batch.
    async def caller(k: int) -> None:
        for j in range(20):
            order = make_order(order_id=oid(1000 + 20 * k + j), client_order_id=f"loop-{k}-{j}")
            assert (await store.insert_if_absent(order)) == (order, True)

    before = store.transactions
    await asyncio.gather(*(caller(k) for k in range(32)))
    assert store.writes == 600 + 640
    assert store.transactions - before < 640 / 4

    await store.close()
    assert backend.count("orders") == 1240
    assert backend.count("order_events") == 1240
    reopened = await backend.open()
    assert await reopened.get("acct-1", oid(1)) == batch[0]
    assert len(await reopened.list("acct-1", 2000, None)) == 1240


async def test_max_batch_1_is_one_transaction_per_write(
    backend: Backend, make_order: Callable[..., Order]
) -> None:
    store = await backend.open(max_batch=1)
    assert isinstance(store, SqliteOrderStore | PostgresOrderStore)
    await asyncio.gather(*(store.insert_if_absent(order) for order in orders(make_order, 40)))
    assert store.transactions == store.writes == 40
    assert backend.count("orders") == 40


async def test_same_key_twice_in_one_batch_creates_one_order(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    assert isinstance(store, SqliteOrderStore | PostgresOrderStore)  # the group-commit counters are theirs
    first = make_order(order_id=oid(1), client_order_id="dup")
    second = make_order(order_id=oid(2), client_order_id="dup")
    other = make_order(order_id=oid(3), client_order_id="other")
    results = await asyncio.gather(
        store.insert_if_absent(first), store.insert_if_absent(other), store.insert_if_absent(second)
    )
    assert (store.transactions, store.writes) == (1, 3)
    assert list(results) == [(first, True), (other, True), (first, False)]  # the second sees the first
    assert await store.get("acct-1", second.order_id) is None
    assert backend.count("orders") == 2
    assert backend.count("order_events") == 2

    # Fifty identical places in one batch: exactly one creates, all see it.
    copies = [make_order(order_id=oid(100 + i), client_order_id="many") for i in range(50)]
    many = await asyncio.gather(*(store.insert_if_absent(order) for order in copies))
    assert sum(created for _, created in many) == 1
    assert {stored for stored, _ in many} == {copies[0]}


async def test_failing_write_fails_only_its_caller(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    assert isinstance(store, SqliteOrderStore | PostgresOrderStore)  # the group-commit counters are theirs
    kept = make_order(order_id=oid(1), client_order_id="kept")
    await store.insert_if_absent(kept)
    batch = orders(make_order, 9, start=10)
    doomed = batch[4]
    _install_write_failure(backend, doomed.order_id)

    before = store.transactions
    results = await settle(
        *(store.insert_if_absent(order) for order in batch),
        store.transition("acct-1", kept.order_id, OrderStatus.OPEN, OrderStatus.CANCELED, 7),
        store.transition("acct-1", doomed.order_id, OrderStatus.OPEN, OrderStatus.CANCELED, 8),
    )
    assert store.transactions == before + 1
    for order, result in zip(batch, results, strict=False):
        if order is doomed:
            assert isinstance(result, Exception) and "boom" in str(result)
        else:
            assert result == (order, True)
    canceled, doomed_transition = results[-2:]
    assert isinstance(canceled, Order) and canceled.status is OrderStatus.CANCELED
    assert doomed_transition is None  # its insert was rolled back, so there is nothing to cancel

    # The failed write left nothing behind (neither its order row nor its event); the others committed.
    assert await store.get("acct-1", doomed.order_id) is None
    assert backend.count("orders") == 1 + 8
    assert backend.count("order_events") == 1 + 8 + 1  # placements, and kept's cancellation
    # A failing transition in a batch is rolled back alone too.
    ok, bad = batch[0], make_order(order_id=doomed.order_id, client_order_id="later")
    results = await settle(
        store.transition("acct-1", ok.order_id, OrderStatus.OPEN, OrderStatus.FILLED, 9),
        store.insert_if_absent(bad),
        store.insert_if_absent(make_order(order_id=oid(50), client_order_id="c-50")),
    )
    assert isinstance(results[0], Order) and results[0].status is OrderStatus.FILLED
    assert isinstance(results[1], Exception) and "boom" in str(results[1])
    third = results[2]
    assert isinstance(third, tuple) and third[1] is True
    assert backend.count("orders") == 1 + 8 + 1


async def test_commit_failure_fails_the_whole_batch(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    assert isinstance(store, SqliteOrderStore | PostgresOrderStore)  # the group-commit counters are theirs
    kept = make_order(order_id=oid(1), client_order_id="kept")
    await store.insert_if_absent(kept)
    _install_commit_failure(backend)

    batch = orders(make_order, 6, start=10)
    poison = make_order(order_id=oid(99), client_order_id="poison")
    before = store.transactions
    results = await settle(
        *(store.insert_if_absent(order) for order in batch[:3]),
        store.insert_if_absent(poison),
        *(store.insert_if_absent(order) for order in batch[3:]),
        store.transition("acct-1", kept.order_id, OrderStatus.OPEN, OrderStatus.CANCELED, 7),
    )
    assert store.transactions == before + 1
    assert all(isinstance(result, Exception) for result in results)
    assert len({id(result) for result in results}) == 1  # the COMMIT's one error, for every caller
    assert "FOREIGN KEY" in str(results[0]) or "boom at commit" in str(results[0])

    # Nothing of the batch is stored, and the store goes on working.
    assert backend.count("orders") == 1
    assert backend.count("order_events") == 1
    assert await store.get("acct-1", kept.order_id) == kept
    retried = await asyncio.gather(*(store.insert_if_absent(order) for order in batch))
    assert all(created for _, created in retried)
    assert backend.count("orders") == 7


async def test_close_commits_queued_writes_then_refuses(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    batch = orders(make_order, 300)
    writes = [asyncio.ensure_future(store.insert_if_absent(order)) for order in batch]
    await asyncio.sleep(0)  # the writes are queued
    await store.close()
    assert all(write.done() for write in writes)
    assert [write.result() for write in writes] == [(order, True) for order in batch]
    with pytest.raises(RuntimeError, match="closed"):
        await store.insert_if_absent(make_order(order_id=oid(999), client_order_id="late"))
    assert backend.count("orders") == 300


async def test_sqlite_cancelled_callers(tmp_path: Path, make_order: Callable[..., Order]) -> None:
    """A caller cancelled while queued is never written; one whose transaction started is written anyway."""
    store = await SqliteOrderStore.open(tmp_path / "orders.sqlite3")
    release, entered = threading.Event(), threading.Event()

    def block(_conn: object) -> bool:
        entered.set()
        return release.wait(10)

    try:
        blocker = asyncio.ensure_future(store.worker.run(block))  # occupy the writer thread
        await eventually(entered.is_set)
        started = asyncio.ensure_future(
            store.insert_if_absent(make_order(order_id=oid(1), client_order_id="a"))
        )
        await eventually(lambda: store.transactions == 1)  # its batch went to the writer (behind the blocker)
        queued = [
            asyncio.ensure_future(
                store.insert_if_absent(make_order(order_id=oid(i), client_order_id=f"q{i}"))
            )
            for i in (2, 3)
        ]
        await eventually(lambda: store.group.pending == 2)
        started.cancel()
        queued[0].cancel()
    finally:
        release.set()
    await blocker
    assert await queued[1] == (make_order(order_id=oid(3), client_order_id="q3"), True)
    with pytest.raises(asyncio.CancelledError):
        await started
    assert await store.get("acct-1", oid(1)) is not None  # written: its transaction had started
    assert await store.get("acct-1", oid(2)) is None  # never written: cancelled while queued
    assert (store.transactions, store.writes) == (2, 2)
    await store.close()


# --- the pre-trade controls' contract -------------------------------------------------------------------


def admission(
    seen: list[tuple[list[tuple[KillScope, str]], Decimal]],
    notional: Decimal | None = Decimal(150),
    refuse: bool = False,
    api_key_id: str = "key-1",
) -> Admission:
    def admit(covering: list[tuple[KillScope, str]], open_notional: Decimal) -> None:
        seen.append((covering, open_notional))
        if refuse:
            raise FailedPrecondition("refused", reason="TEST_REFUSED")

    return Admission(notional, api_key_id, admit)


async def test_an_admission_sees_the_open_notional_and_covering_switches(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    seen: list[tuple[list[tuple[KillScope, str]], Decimal]] = []
    await store.insert_if_absent(
        make_order(order_id=oid(1), client_order_id="a"), admission(seen, Decimal("0.5"))
    )
    await store.insert_if_absent(make_order(order_id=oid(2), client_order_id="b"), admission(seen, None))
    await store.insert_if_absent(make_order(order_id=oid(3), client_order_id="c"), admission(seen))
    await store.insert_if_absent(
        make_order(order_id=oid(4), client_order_id="d", account_id="acct-2"), admission(seen)
    )
    await store.transition("acct-1", oid(3), OrderStatus.OPEN, OrderStatus.CANCELED, 1)
    await store.insert_if_absent(make_order(order_id=oid(5), client_order_id="e"), admission(seen))
    # open notional of acct-1: 0 / 0.5 / 0.5 (none for b) / 0 (acct-2) / 0.5 (c cancelled)
    assert [total for _, total in seen] == [0, Decimal("0.5"), Decimal("0.5"), 0, Decimal("0.5")]
    assert backend.execute(
        "SELECT notional, api_key_id FROM {schema}.orders WHERE order_id = %s", (oid(1),)
    ) in (
        [("0.5", "key-1")],
        [(Decimal("0.5"), "key-1")],
    )
    switch = KillSwitch("ks_1", KillScope.SYMBOL, "BTC-USD", "halt", "usr", 10)
    await store.engage(switch)
    await store.engage(KillSwitch("ks_2", KillScope.API_KEY, "key-9", "halt", "usr", 10))
    seen.clear()
    with pytest.raises(FailedPrecondition):
        await store.insert_if_absent(
            make_order(order_id=oid(6), client_order_id="f"), admission(seen, refuse=True)
        )
    await store.insert_if_absent(
        make_order(order_id=oid(7), client_order_id="g", symbol="ETH-USD"), admission(seen)
    )
    assert [covering for covering, _ in seen] == [[(KillScope.SYMBOL, "BTC-USD")], []]


async def test_the_open_notional_is_kept_exactly_beyond_28_digits(
    store: OrderStore, make_order: Callable[..., Order]
) -> None:
    seen: list[tuple[list[tuple[KillScope, str]], Decimal]] = []
    for i, notional in enumerate(["1000000000000", "0.0000000000000001", "0"], start=1):
        order = make_order(order_id=oid(i), client_order_id=f"x{i}")
        await store.insert_if_absent(order, admission(seen, Decimal(notional)))
    assert [total for _, total in seen] == [0, Decimal("1e12"), Decimal("1000000000000.0000000000000001")]
    await store.transition("acct-1", oid(1), OrderStatus.OPEN, OrderStatus.CANCELED, 5)
    await store.insert_if_absent(make_order(order_id=oid(4), client_order_id="x4"), admission(seen, None))
    assert seen[-1][1] == Decimal("0.0000000000000001")


async def test_a_refused_admission_inserts_nothing_and_a_replay_is_not_admitted_again(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    seen: list[tuple[list[tuple[KillScope, str]], Decimal]] = []
    with pytest.raises(FailedPrecondition, match="refused"):
        await store.insert_if_absent(make_order(), admission(seen, refuse=True))
    assert backend.count("orders") == 0 and backend.count("order_events") == 0
    assert (await store.insert_if_absent(make_order(), admission(seen)))[1]
    stored, created = await store.insert_if_absent(make_order(order_id=oid(9)), admission(seen, refuse=True))
    assert not created and stored == make_order()  # the existing order: admit is not called for it
    assert len(seen) == 2


async def test_engage_cancels_in_one_transaction_and_moves_the_version(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    assert await store.control_version() == 0
    for i, symbol in enumerate(("BTC-USD", "ETH-USD", "BTC-USD"), start=1):
        await store.insert_if_absent(make_order(order_id=oid(i), client_order_id=f"c{i}", symbol=symbol))
    engaged, cancelled = await store.engage(
        KillSwitch("ks_1", KillScope.SYMBOL, "BTC-USD", "halt", "usr", 99)
    )
    assert (engaged.switch_id, cancelled) == ("ks_1", 2)
    assert await store.control_version() == 1
    statuses = {o.order_id: (o.status, o.update_time_us) for o in await store.list("acct-1", 10, None)}
    assert statuses[oid(1)] == (OrderStatus.CANCELED, 99) and statuses[oid(2)][0] is OrderStatus.OPEN
    assert backend.execute("SELECT count(*) FROM {schema}.order_events WHERE status = 2")[0][0] == 2
    again, cancelled = await store.engage(
        KillSwitch("ks_2", KillScope.SYMBOL, "BTC-USD", "again", "usr2", 100)
    )
    assert (again.switch_id, again.reason, cancelled) == ("ks_1", "halt", 0)
    controls = await store.controls()
    assert (controls.version, [s.switch_id for s in controls.switches]) == (2, ["ks_1"])
    assert await store.release(KillScope.SYMBOL, "ETH-USD", "u", "r", 101) is None
    released = await store.release(KillScope.SYMBOL, "BTC-USD", "usr3", "clear", 102)
    assert released is not None and (released.released_by, released.released_at_us) == ("usr3", 102)
    assert (await store.controls()).switches == []
    assert [s.switch_id for s in await store.kill_switches(include_released=True)] == ["ks_1"]
    assert await store.kill_switches() == []
    # a new switch for the same scope after the release: a new row, the old one stays history
    await store.engage(KillSwitch("ks_3", KillScope.SYMBOL, "BTC-USD", "again", "usr", 103))
    assert [s.switch_id for s in await store.kill_switches(include_released=True)] == ["ks_3", "ks_1"]


async def test_overrides_and_prices_are_shared_and_a_late_price_never_wins(store: OrderStore) -> None:
    await store.set_override("acct-1", '{"max_quantity":"5"}', "usr", 1)
    await store.set_reference_price("BTC-USD", Decimal("64000.5"), 10)
    await store.set_reference_price("BTC-USD", Decimal(1), 9)  # observed earlier: ignored
    controls = await store.controls()
    assert controls.overrides == {"acct-1": '{"max_quantity":"5"}'}
    assert controls.prices == {"BTC-USD": (Decimal("64000.5"), 10)}
    await store.set_override("acct-1", None, "usr", 2)
    controls = await store.controls()
    assert controls.overrides == {} and controls.version == 4


async def test_engage_waits_for_an_insert_holding_the_control_lock(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    """An insert transaction in flight when a switch is engaged: the engage waits for it and cancels its order.
    (Without the lock, the engage would commit first and the order would stay OPEN in scope.)"""
    order = make_order()
    if backend.kind == "sqlite":
        pytest.skip("SQLite: one writer per database file (BEGIN IMMEDIATE) by construction")
    conn_pg = await psycopg.AsyncConnection.connect(PG_DSN)
    try:
        await conn_pg.execute(f'SELECT version FROM "{backend.schema}".control WHERE id = 1 FOR UPDATE')
        engaging = asyncio.ensure_future(
            store.engage(KillSwitch("ks_1", KillScope.GLOBAL, "", "halt", "usr", 5))
        )
        await eventually(
            lambda: bool(
                backend.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                    (f"%{backend.schema}%control%",),
                )[0][0]
            )
        )
        await conn_pg.execute(
            f'INSERT INTO "{backend.schema}".orders (order_id, account_id, client_order_id, symbol, side, '
            "type, time_in_force, quantity, price, status, create_time_us, update_time_us) VALUES "
            "(%s, 'acct-1', 'c-1', 'BTC-USD', 1, 1, 1, 1, 1, 1, 1, 1)",
            (order.order_id,),
        )
        await conn_pg.commit()
    finally:
        await conn_pg.close()
    _, cancelled = await engaging
    assert cancelled == 1
    stored = await store.get("acct-1", order.order_id)
    assert stored is not None and stored.status is OrderStatus.CANCELED


def exposure_matches_open_orders(backend: Backend) -> None:
    """The kept open notional of every account is the sum of the notional of its OPEN orders."""
    kept = {
        a: Decimal(str(n))
        for a, n in backend.execute("SELECT account_id, open_notional FROM {schema}.account_exposure")
    }
    summed: dict[str, Decimal] = {}
    for account, notional in backend.execute(
        "SELECT account_id, notional FROM {schema}.orders WHERE status = 1 AND notional IS NOT NULL"
    ):
        summed[account] = summed.get(account, Decimal(0)) + Decimal(str(notional))
    assert {a: n for a, n in kept.items() if n} == summed


async def test_the_kept_open_notional_follows_inserts_cancels_and_engages(
    backend: Backend, store: OrderStore, make_order: Callable[..., Order]
) -> None:
    seen: list[tuple[list[tuple[KillScope, str]], Decimal]] = []
    for i in range(1, 13):
        order = make_order(
            order_id=oid(i),
            client_order_id=f"c{i}",
            account_id=f"acct-{i % 3}",
            symbol=("BTC-USD", "ETH-USD")[i % 2],
        )
        await store.insert_if_absent(order, admission(seen, Decimal(i) / 4 if i % 5 else None))
    exposure_matches_open_orders(backend)
    await store.transition("acct-1", oid(1), OrderStatus.OPEN, OrderStatus.CANCELED, 5)
    await store.transition("acct-1", oid(4), OrderStatus.OPEN, OrderStatus.FILLED, 5)
    await store.transition("acct-1", oid(4), OrderStatus.OPEN, OrderStatus.CANCELED, 6)  # not open: no change
    exposure_matches_open_orders(backend)
    await store.engage(KillSwitch("ks_1", KillScope.SYMBOL, "ETH-USD", "halt", "usr", 7))
    exposure_matches_open_orders(backend)
    await store.engage(KillSwitch("ks_2", KillScope.GLOBAL, "", "halt", "usr", 8))
    exposure_matches_open_orders(backend)
    assert all(
        Decimal(str(n)) == 0
        for (n,) in backend.execute("SELECT open_notional FROM {schema}.account_exposure")
    )


async def test_migration_3_counts_the_open_orders_already_there(
    backend: Backend, make_order: Callable[..., Order]
) -> None:
    if backend.kind == "sqlite":
        worker = await SqliteWorker.open(backend.path, store_sqlite.MIGRATIONS[:2], name="v2")
        await worker.close()
    else:
        pool = await open_pool(PG_DSN, backend.schema, store_postgres.MIGRATIONS[:2], min_size=1, max_size=1)
        await pool.close()
    for i, (status, notional) in enumerate([(1, "1.5"), (1, "2.25"), (2, "100"), (1, None)], start=1):
        backend.execute(
            "INSERT INTO {schema}.orders (order_id, account_id, client_order_id, symbol, side, type, time_in_force, "
            "quantity, price, status, create_time_us, update_time_us, notional) VALUES "
            "(%s, 'acct-1', %s, 'BTC-USD', 1, 1, 1, '1', '1', %s, 1, 1, %s)",
            (oid(i), f"c{i}", status, notional),
        )
    await backend.open()
    exposure_matches_open_orders(backend)
    assert [
        Decimal(str(n)) for (n,) in backend.execute("SELECT open_notional FROM {schema}.account_exposure")
    ] == [Decimal("3.75")]
