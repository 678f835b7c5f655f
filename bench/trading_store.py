"""Order-store inserts/s with group commit against one transaction per write (max_batch=1), in one run, as a ratio.

Closed loop: N concurrent callers, each inserting a new order as soon as its last one is acknowledged (durable).
Both stores are real (SQLite files in a temporary directory, WAL + synchronous=FULL; with --pg, also PostgreSQL
in two throw-away schemas) and live in this process; rounds alternate between them so that drift hits both alike.

    python -m bench.trading_store [--concurrency 32] [--duration 5] [--rounds 3] [--pg postgresql://...]
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from decimal import Decimal
from pathlib import Path

import tradeguard  # noqa: F401
from bench.loadgen import Call, Result, closed_loop, load_arguments, median_ratio
from services.trading.model import Order, OrderStatus, OrderType, Side, TimeInForce
from services.trading.store_postgres import PostgresOrderStore
from services.trading.store_sqlite import SqliteOrderStore

Store = SqliteOrderStore | PostgresOrderStore


def inserter(store: Store, tag: str) -> Call:
    base_us = 1_700_000_000_000_000

    async def call(i: int) -> object:
        order = Order(
            order_id=f"ord_{tag}{i:0{26 - len(tag)}d}",
            account_id=f"acct-{i % 16}",
            client_order_id=f"{tag}-{i}",
            symbol="BTC-USD",
            side=Side.BUY,
            type=OrderType.LIMIT,
            time_in_force=TimeInForce.GTC,
            quantity=Decimal("0.01"),
            price=Decimal("64000.5"),
            status=OrderStatus.OPEN,
            create_time_us=base_us + i,
            update_time_us=base_us + i,
        )
        _, created = await store.insert_if_absent(order)
        if not created:
            raise RuntimeError(f"order {order.order_id} was not created")
        return None

    return call


async def compare(
    name: str, stores: dict[str, Store], concurrency: int, duration: float, rounds: int
) -> None:
    print(
        f"\n{name}: insert_if_absent, {concurrency} concurrent callers, {duration:.0f} s per round, {rounds} rounds"
    )
    results: dict[str, list[Result]] = {mode: [] for mode in stores}
    for r in range(rounds):
        for mode, store in stores.items():
            transactions, writes = store.transactions, store.writes
            res = await closed_loop(
                inserter(store, f"{mode[0]}{r}"), concurrency=concurrency, duration=duration
            )
            results[mode].append(res)
            batch = (store.writes - writes) / max(1, store.transactions - transactions)
            print(f"{res.line(f'round {r + 1} {mode}')}   avg batch {batch:5.1f}")
    ratio = median_ratio(results["group"], results["single"])
    print(f"{name}: group commit / one transaction per write (median of rounds): {ratio:.2f}x")


async def run(concurrency: int, duration: float, rounds: int, pg: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite: dict[str, Store] = {
            "group": await SqliteOrderStore.open(Path(tmp) / "group.sqlite3"),
            "single": await SqliteOrderStore.open(Path(tmp) / "single.sqlite3", max_batch=1),
        }
        try:
            await compare("SQLite", sqlite, concurrency, duration, rounds)
        finally:
            for store in sqlite.values():
                await store.close()
    if pg is None:
        return
    schemas = {mode: f"bench_trading_{mode}_{secrets.token_hex(4)}" for mode in ("group", "single")}
    postgres: dict[str, Store] = {
        "group": await PostgresOrderStore.open(pg, schema=schemas["group"]),
        "single": await PostgresOrderStore.open(pg, schema=schemas["single"], max_batch=1),
    }
    try:
        await compare("PostgreSQL", postgres, concurrency, duration, rounds)
    finally:
        import psycopg
        from psycopg import sql

        for store in postgres.values():
            await store.close()
        async with await psycopg.AsyncConnection.connect(pg, autocommit=True) as conn:
            for schema in schemas.values():
                await conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def main() -> None:
    parser = load_arguments(__doc__)
    parser.add_argument("--pg", metavar="DSN", help="also measure PostgreSQL at this DSN")
    args = parser.parse_args()
    asyncio.run(run(args.concurrency, args.duration, args.rounds, args.pg))


if __name__ == "__main__":
    main()
