"""Group commit in both real stores: concurrent writes share transactions, each write succeeds or fails on its own,
and nothing is acknowledged before the COMMIT that includes it (see services/trading/group_commit.py).

Writes started in one event-loop turn while the store is idle go together in the next transaction, so an
`asyncio.gather` of writes is one batch (asserted through the store's `transactions` / `writes` counters).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from services.trading.core import Order, OrderStatus
from services.trading.store_sqlite import SqliteOrderStore
from tests.support import eventually


def oid(i: int) -> str:
    return f"ord_{i:026d}"


def orders(make_order, n: int, start: int = 1) -> list[Order]:
    return [make_order(order_id=oid(i), client_order_id=f"c-{i}") for i in range(start, start + n)]


async def settle(*calls: Any) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=True)


def _install_write_failure(backend, order_id: str) -> None:
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


def _install_commit_failure(backend) -> None:
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


async def test_lone_write_is_its_own_transaction(store, make_order):
    assert (await store.insert_if_absent(make_order()))[1]
    assert (store.transactions, store.writes) == (1, 1)


async def test_concurrent_writes_share_transactions_and_survive_restart(backend, store, make_order):
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


async def test_max_batch_1_is_one_transaction_per_write(backend, make_order):
    store = await backend.open(max_batch=1)
    await asyncio.gather(*(store.insert_if_absent(order) for order in orders(make_order, 40)))
    assert store.transactions == store.writes == 40
    assert backend.count("orders") == 40


async def test_same_key_twice_in_one_batch_creates_one_order(backend, store, make_order):
    first = make_order(order_id=oid(1), client_order_id="dup")
    second = make_order(order_id=oid(2), client_order_id="dup")
    other = make_order(order_id=oid(3), client_order_id="other")
    results = await asyncio.gather(
        store.insert_if_absent(first), store.insert_if_absent(other), store.insert_if_absent(second)
    )
    assert (store.transactions, store.writes) == (1, 3)
    assert results == [(first, True), (other, True), (first, False)]  # the second sees the first
    assert await store.get("acct-1", second.order_id) is None
    assert backend.count("orders") == 2
    assert backend.count("order_events") == 2

    # Fifty identical places in one batch: exactly one creates, all see it.
    copies = [make_order(order_id=oid(100 + i), client_order_id="many") for i in range(50)]
    results = await asyncio.gather(*(store.insert_if_absent(order) for order in copies))
    assert sum(created for _, created in results) == 1
    assert {stored for stored, _ in results} == {copies[0]}


async def test_failing_write_fails_only_its_caller(backend, store, make_order):
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
    assert results[2][1] is True
    assert backend.count("orders") == 1 + 8 + 1


async def test_commit_failure_fails_the_whole_batch(backend, store, make_order):
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
    results = await asyncio.gather(*(store.insert_if_absent(order) for order in batch))
    assert all(created for _, created in results)
    assert backend.count("orders") == 7


async def test_close_commits_queued_writes_then_refuses(backend, store, make_order):
    batch = orders(make_order, 300)
    writes = [asyncio.ensure_future(store.insert_if_absent(order)) for order in batch]
    await asyncio.sleep(0)  # the writes are queued
    await store.close()
    assert all(write.done() for write in writes)
    assert [write.result() for write in writes] == [(order, True) for order in batch]
    with pytest.raises(RuntimeError, match="closed"):
        await store.insert_if_absent(make_order(order_id=oid(999), client_order_id="late"))
    assert backend.count("orders") == 300


async def test_sqlite_cancelled_callers(tmp_path, make_order):
    """A caller cancelled while queued is never written; one whose transaction started is written anyway."""
    store = await SqliteOrderStore.open(tmp_path / "orders.sqlite3")
    release, entered = threading.Event(), threading.Event()

    def block(_conn: object) -> bool:
        entered.set()
        return release.wait(10)

    try:
        blocker = asyncio.ensure_future(store._run(block))  # occupy the writer thread
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
        await eventually(lambda: len(store.group._pending) == 2)
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
