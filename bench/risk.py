"""Pre-trade risk checks per second, every check on beside none, in one run (tradeguard/risk, in this process).

One `RiskEngine`, the same orders, two configurations, alternating round by round:

  none   no limit configured: `check` reads the account's limits, the clock, and returns the notional
  all    every check on, and every order passing all of them (so each does its whole work): throttle (a window
         wide enough never to refuse), restricted symbols, maximum quantity, price collar around a reference
         price from the in-process feed, maximum notional, credit limit (an open notional passed in) and
         duplicate detection (each order distinct, so each is recorded; the records reach their bound and the
         oldest are evicted, the engine's steady state under load)

The orders are built before the clock starts and cycle over 1,000 accounts and 8 symbols; the clock is the wall
clock (its read is part of the cost). Printed per round: checks/s and µs per check of each; then the medians and
the µs that the checks add to one order. The aim (issue 10) is PlaceOrder with every risk check on costing
under 5 % more than with none: compare the added µs with the CPU µs per PlaceOrder that bench.trading_mtls
prints.

    python -m bench.risk [--orders 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from decimal import Decimal

from tradeguard.risk.checks import RiskEngine
from tradeguard.risk.model import AccountLimits, OrderType, RiskConfig, RiskOrder, Side, Throttle
from tradeguard.risk.reference import PriceFeed

SYMBOLS = ("BTC-USD", "ETH-USD", "SOL-USD", "AAPL", "MSFT", "EUR/USD", "GBP/USD", "XAU-USD")
ACCOUNTS = 1_000

ALL = RiskConfig(
    defaults=AccountLimits(
        max_quantity=Decimal("1000000"),
        max_notional=Decimal("1e12"),
        price_collar=Decimal("0.05"),
        credit_limit=Decimal("1e15"),
        restricted_symbols=frozenset({"DOGE-USD", "GME"}),
        duplicate_window_us=1_000_000,
        throttle=Throttle(messages=10_000, window_us=1_000),
    )
)
NONE = RiskConfig()


def clock_us() -> int:
    return time.time_ns() // 1000


def orders(count: int, tag: str, first: int = 0) -> list[RiskOrder]:
    """`count` orders numbered from `first`: distinct from those of any other number, so never duplicates."""
    return [
        RiskOrder(
            account_id=f"acct-{i % ACCOUNTS}",
            api_key_id=f"tgk_{i % ACCOUNTS}",
            client_order_id=f"{tag}-{i}",
            symbol=SYMBOLS[i % len(SYMBOLS)],
            side=Side.BUY if i % 2 else Side.SELL,
            type=OrderType.LIMIT,
            quantity=Decimal(1 + i % 997) + Decimal(i) / Decimal(10**8),  # distinct: never a duplicate
            price=Decimal("100.25") + Decimal(i % 9 - 4) / 4,  # within 5 % of 100.25
        )
        for i in range(first, first + count)
    ]


def run(check: Callable[[RiskOrder, Decimal | None], object], batch: list[RiskOrder]) -> float:
    """Seconds of CPU (this thread) for `check` over the batch."""
    open_notional = Decimal("12345.5")
    start = time.thread_time()
    for order in batch:
        check(order, open_notional)
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=200_000, help="orders checked per round and mode")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    args = parser.parse_args()

    feed = PriceFeed(clock_us, max_age_us=3_600_000_000)
    feed.update(dict.fromkeys(SYMBOLS, Decimal("100.25")))
    engines = {
        "none": RiskEngine(lambda: NONE, feed, clock_us),
        "all": RiskEngine(lambda: ALL, feed, clock_us, max_duplicates=100_000),
    }
    print(f"risk checks: {args.orders} orders per round and mode, {args.rounds} rounds, one thread")
    per_check: dict[str, list[float]] = {mode: [] for mode in engines}
    for r in range(args.rounds):
        for mode, engine in engines.items():
            batch = orders(args.orders, f"{mode}{r}", r * args.orders)
            seconds = run(engine.check, batch)
            us = seconds * 1e6 / len(batch)
            per_check[mode].append(us)
            print(f"  round {r + 1}  {mode:4}  {len(batch) / seconds:12,.0f} checks/s  {us:6.2f} µs/check")
    none_us, all_us = (statistics.median(per_check[m]) for m in ("none", "all"))
    print(f"median: none {none_us:.2f} µs/check, all {all_us:.2f} µs/check")
    print(f"every check on adds {all_us - none_us:.2f} µs per order (beside the CPU µs of one PlaceOrder)")
    print(
        f"duplicate records held: {engines['all'].duplicate_records} (bound {engines['all'].max_duplicates})"
    )


if __name__ == "__main__":
    main()
