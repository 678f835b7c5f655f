"""Crash safety of the trading service's audit trail: `python -m services.trading` (its guard verifying tokens
at the session's auth service, counting calls at its rate-limit service, recording every call at an audit
process of this test's own, a fresh log) killed with SIGKILL while CLIENTS concurrent clients place orders.

The guard's audit stage appends an accepted call's event beside the handler and releases the response only
once the audit service has acknowledged it (tradeguard/guard/audit.py). So what must hold after the kill:
- every order a client got an OK answer for has exactly one OUTCOME_OK PlaceOrder event in the audit log, its
  `resource` the order's client_order_id (tradeguard/guard/layer.py `_resource`: PlaceOrderRequest has no
  order_id), recorded by the trader the token belongs to;
- no event names an order that was never sent, and no call is recorded twice;
- a call that failed because of the kill (UNAVAILABLE: the connection was reset, or refused for a call begun
  after) may or may not have its event, and its order may or may not be stored (its client must treat the
  outcome as unknown); both counts are printed; but no order is stored without its event (PlaceOrder is
  write-ahead: its handler runs only once its event is durable — with the guard appending beside the handler
  instead, AUDIT_WRITE_AHEAD=false, 1 to 28 orders per run were stored with no event);
- after trading is started again on the same database, every acknowledged order is in its store under the
  order id it was acknowledged with;
- the whole audit log verifies: `tradeguard audit verify` (the command line, as a process) recomputes the tree
  from the stored entries and checks every checkpoint signed before, during and after the kill.

Meanwhile another recorder (workload `ratelimit`) appends batches of its own events (method NOISE), as other
services do in production: the audit service's commits are larger and slower than the trading store's, which
opens the window in which a guard releasing a response before its event is durable loses acknowledged
orders (with the guard changed to answer before the acknowledgement, this test fails in most runs: tens of
acknowledged orders without an event).

The kill comes once KILL_AFTER orders were acknowledged (the test waits for that count, never for a guessed
delay), and the test asserts it came mid-stream: calls were in flight at that moment and at least one of them
failed. Timeouts are generous (the machine may be loaded); each is there only so that a hang fails the test.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.support import (
    ROOT,
    AuthServices,
    create_auth_user,
    free_port,
    log_in,
    run_module,
    stop_process,
    wait_healthy,
)
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.guard.client import authenticated_channel, bearer_interceptors
from tradeguard.mesh import pki, tls
from tradeguard.testing import eventually
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc

PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
CLIENTS = 32
KILL_AFTER = 200  # acknowledged orders before the kill
CALL_S = 60.0  # only there so that a hang fails the test instead of stalling it
PAGE = 1000
NOISE = "/tradeguard.test.v1.Noise/Record"  # the other recorder's events (never PlaceOrder)
NOISE_RECORDERS = 2
NOISE_BATCH = 250


@dataclass
class Ledger:
    """What the clients sent and how each call ended (by client_order_id)."""

    sent: set[str] = field(default_factory=set)
    in_flight: set[str] = field(default_factory=set)
    acknowledged: dict[str, str] = field(default_factory=dict)  # client_order_id → order_id
    failed: dict[str, grpc.StatusCode] = field(default_factory=dict)
    in_flight_at_kill: frozenset[str] = frozenset()
    killed: bool = False
    early_errors: list[str] = field(default_factory=list)  # failures before the kill: none expected


def trading_process(
    home: Path, port: int, auth: AuthServices, audit_target: str, run: int
) -> subprocess.Popen[bytes]:
    """`python -m services.trading` on `port`, its own SQLite database under `home`, its guard at the
    session's auth and rate-limit services and at `audit_target`; its output in `home/trading-<run>.log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
    env.update(
        TRADEGUARD_HOME=str(home),
        TRADEGUARD_TRADING_PORT=str(port),
        TRADEGUARD_TRADING_DATABASE_URL=f"sqlite:///{home / 'data' / 'trading.db'}",
        TRADEGUARD_TRADING_GRACE_S="0",
        TRADEGUARD_TRADING_AUTH_TARGET=auth.auth_target,
        TRADEGUARD_TRADING_RATELIMIT_TARGET=auth.ratelimit_target,
        TRADEGUARD_TRADING_AUDIT_TARGET=audit_target,
        TRADEGUARD_TRADING_RISK="0",  # 32 clients of one account at any price: the audit trail is under test
        PYTHONUNBUFFERED="1",
    )
    with (home / f"trading-{run}.log").open("ab") as log:  # a file, not a pipe: a full pipe would block it
        return subprocess.Popen(
            [sys.executable, "-m", "services.trading"], env=env, stdout=log, stderr=log, cwd=ROOT
        )


async def until(attempt: Callable[[], Awaitable[bool]], within_s: float = CALL_S) -> None:
    """Until `attempt()` answers True (each attempt is a call: there is nothing to wait on between them)."""
    async with asyncio.timeout(within_s):
        while not await attempt():  # noqa: ASYNC110 - polling a remote state, one call per attempt
            await asyncio.sleep(0.05)


async def guard_ready(stub: trading_pb2_grpc.TradingServiceAsyncStub, account: str) -> None:
    """Until the guard accepts the token (its revocation stream is up, moments after the server is)."""

    async def accepted() -> bool:
        try:
            await stub.ListOrders(trading_pb2.ListOrdersRequest(account_id=account, page_size=1), timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            return False
        return True

    await until(accepted)


def order(account: str, client_order_id: str) -> trading_pb2.PlaceOrderRequest:
    return trading_pb2.PlaceOrderRequest(
        account_id=account,
        client_order_id=client_order_id,
        symbol="BTC-USD",
        side=trading_pb2.SIDE_BUY,
        type=trading_pb2.ORDER_TYPE_LIMIT,
        quantity="1",
        price="100",
    )


async def client(channel: grpc.aio.Channel, account: str, ledger: Ledger, c: int) -> None:
    """Places orders one after the other until a call fails (after the kill, each client's first failure)."""
    stub = trading_pb2_grpc.TradingServiceStub(channel)
    n = 0
    while True:
        client_order_id = f"crash-{c}-{n}"
        n += 1
        ledger.sent.add(client_order_id)
        ledger.in_flight.add(client_order_id)
        try:
            reply = await stub.PlaceOrder(order(account, client_order_id), timeout=CALL_S)
        except grpc.aio.AioRpcError as error:
            ledger.failed[client_order_id] = error.code()
            if not ledger.killed:
                ledger.early_errors.append(f"{client_order_id}: {error.code().name} {error.details()}")
            return
        finally:
            ledger.in_flight.discard(client_order_id)
        if reply.order.client_order_id != client_order_id or reply.replayed:
            ledger.early_errors.append(
                f"{client_order_id}: answered {reply.order}, replayed {reply.replayed}"
            )
            return
        ledger.acknowledged[client_order_id] = reply.order.order_id


async def other_recorder(audit: audit_pb2_grpc.AuditServiceAsyncStub, w: int) -> None:
    """Another service recording batches of its own events meanwhile, until cancelled: the audit service is
    busy, its commits larger, as in production, so that a guard releasing a response before its event is
    durable would be caught by the kill."""
    n = 0
    while True:
        now = Timestamp()
        now.GetCurrentTime()
        events = [
            pb.Event(
                event_id=f"noise-{w}-{n + i}",
                time=now,
                method=NOISE,
                outcome=pb.OUTCOME_OK,
                status_code="OK",
            )
            for i in range(NOISE_BATCH)
        ]
        n += NOISE_BATCH
        await audit.AppendBatch(pb.AppendBatchRequest(events=events), timeout=CALL_S)


async def place_until_killed(
    target: str,
    ops: tls.Workload,
    token: str,
    account: str,
    process: subprocess.Popen[bytes],
    recorder: audit_pb2_grpc.AuditServiceAsyncStub,
) -> Ledger:
    """CLIENTS clients (a channel each) placing orders while `recorder` records its own events; `process`
    SIGKILLed once KILL_AFTER orders were acknowledged."""
    ledger = Ledger()
    channels = [
        authenticated_channel(target, "trading", ops, bearer_interceptors(token)) for _ in range(CLIENTS)
    ]
    try:
        await guard_ready(trading_pb2_grpc.TradingServiceStub(channels[0]), account)
        noise = asyncio.gather(*(other_recorder(recorder, w) for w in range(NOISE_RECORDERS)))
        clients = [asyncio.ensure_future(client(ch, account, ledger, c)) for c, ch in enumerate(channels)]
        try:
            await eventually(
                lambda: bool(ledger.early_errors) or noise.done() or len(ledger.acknowledged) >= KILL_AFTER,
                within_s=300,
            )
            assert not ledger.early_errors, ledger.early_errors[:10]
            # no await between the count being reached and the kill: the calls in flight now are the kill's
            ledger.in_flight_at_kill = frozenset(ledger.in_flight)
            ledger.killed = True
            os.kill(process.pid, signal.SIGKILL)
            assert not noise.done(), noise  # the other recorder was still recording (its failure shown)
            async with asyncio.timeout(CALL_S * 2):
                await asyncio.gather(*clients)  # each ends at its first failed call
        finally:
            noise.cancel()
            for task in clients:
                task.cancel()
    finally:
        for ch in channels:
            await ch.close(None)
    assert await asyncio.to_thread(process.wait, CALL_S) == -signal.SIGKILL
    return ledger


async def query_all(audit: audit_pb2_grpc.AuditServiceAsyncStub, method: str) -> list[pb.StoredEntry]:
    """Every entry of `method`, page by page, oldest first."""
    found: list[pb.StoredEntry] = []
    token = ""
    while True:
        reply = await audit.Query(
            pb.QueryRequest(method=method, page_size=PAGE, page_token=token), timeout=CALL_S
        )
        found += reply.entries
        token = reply.next_page_token
        if not token:
            return found


async def log_size(audit: audit_pb2_grpc.AuditServiceAsyncStub) -> int:
    """How many entries the log holds (GetEntries page by page; the sequences are checked to have no gap)."""
    start = 0
    while True:
        reply = await audit.GetEntries(pb.GetEntriesRequest(start=start, count=PAGE), timeout=CALL_S)
        if not reply.entries:
            return start
        assert [e.sequence for e in reply.entries] == list(range(start, start + len(reply.entries)))
        start += len(reply.entries)


async def stored_orders(stub: trading_pb2_grpc.TradingServiceAsyncStub, account: str) -> dict[str, str]:
    """The account's orders in the trading store: client_order_id → order_id."""
    stored: dict[str, str] = {}
    token = ""
    while True:
        page = await stub.ListOrders(
            trading_pb2.ListOrdersRequest(account_id=account, page_size=500, page_token=token), timeout=CALL_S
        )
        stored.update((o.client_order_id, o.order_id) for o in page.orders)
        token = page.next_page_token
        if not token:
            return stored


@pytest.mark.slow
async def test_kill_9_during_concurrent_orders_loses_no_acknowledged_order_event(
    pki_paths: pki.PkiPaths, auth_services: AuthServices
) -> None:
    home = pki_paths.home
    (home / "data").mkdir(parents=True, exist_ok=True)
    ops = tls.Workload.of(pki_paths, "ops")
    account = f"acct-crash-{secrets.token_hex(4)}"
    trader = await create_auth_user(auth_services, account)  # a trader: orders:read, orders:write
    token = await log_in(auth_services, trader, "ops")  # bound to the ops certificate the clients present

    audit_name = f"audit-crash-{secrets.token_hex(4)}"  # a fresh log: only this test's trading records there
    audit_process, audit_target = auth_services.start_audit(
        audit_name, extra={"TRADEGUARD_AUDIT_CHECKPOINT_INTERVAL_S": "0.05"}
    )
    started = [audit_process]
    try:
        await wait_healthy(
            audit_process, audit_target, "audit", ops, auth_services.paths.home / f"{audit_name}.log"
        )

        # --- the stream of orders, and the kill in the middle of it -----------------------------------------
        port = free_port()
        target = f"127.0.0.1:{port}"
        first = trading_process(home, port, auth_services, audit_target, 1)
        started.append(first)
        await wait_healthy(first, target, "trading", ops, home / "trading-1.log")
        async with auth_services.audit_channel("ratelimit", audit_target) as recording:
            recorder = audit_pb2_grpc.AuditServiceStub(recording)
            ledger = await place_until_killed(target, ops, token, account, first, recorder)

        acknowledged = ledger.acknowledged
        assert len(acknowledged) >= KILL_AFTER
        assert ledger.in_flight_at_kill, "no call was in flight when trading was killed"
        killed_in_flight = ledger.in_flight_at_kill & set(ledger.failed)
        assert killed_in_flight, "no call in flight at the kill failed: the kill did not come mid-stream"
        assert set(ledger.failed.values()) == {grpc.StatusCode.UNAVAILABLE}, Counter(ledger.failed.values())
        assert not set(ledger.failed) & set(acknowledged)
        assert set(ledger.failed) | set(acknowledged) == ledger.sent  # every call ended one way or the other

        # --- the audit log, read as ops ---------------------------------------------------------------------
        async with auth_services.audit_channel("ops", audit_target) as channel:
            audit = audit_pb2_grpc.AuditServiceStub(channel)
            entries = await query_all(audit, PLACE)
        events = [e.entry.event for e in entries]
        assert len({e.event_id for e in events}) == len(events)
        recorded = Counter(e.resource for e in events)
        assert set(recorded) <= ledger.sent, set(recorded) - ledger.sent  # nothing that was never sent
        twice = [resource for resource, count in recorded.items() if count > 1]
        assert not twice, twice[:10]  # no call recorded twice
        for event in events:
            assert event.outcome == pb.OUTCOME_OK and event.status_code == "OK", event
            assert (event.principal, event.account_id) == (trader.user_id, account)
            assert event.action == "orders:write" and event.quota_decision == "allowed"
        missing = sorted(set(acknowledged) - set(recorded))
        assert not missing, f"{len(missing)} acknowledged orders have no event: {missing[:10]}"
        failed_with_event = set(ledger.failed) & set(recorded)

        # --- trading again on the same database -------------------------------------------------------------
        second = trading_process(home, port, auth_services, audit_target, 2)
        started.append(second)
        await wait_healthy(second, target, "trading", ops, home / "trading-2.log")
        async with authenticated_channel(target, "trading", ops, bearer_interceptors(token)) as again:
            orders = trading_pb2_grpc.TradingServiceStub(again)
            await guard_ready(orders, account)
            stored = await stored_orders(orders, account)
            for client_order_id, order_id in list(acknowledged.items())[:: max(1, len(acknowledged) // 20)]:
                got = await orders.GetOrder(
                    trading_pb2.GetOrderRequest(account_id=account, order_id=order_id), timeout=CALL_S
                )
                assert got.order.client_order_id == client_order_id
        stop_process(second)
        lost = {c: o for c, o in acknowledged.items() if stored.get(c) != o}
        assert not lost, (
            f"{len(lost)} acknowledged orders not stored as acknowledged: {list(lost.items())[:10]}"
        )
        assert set(stored) <= ledger.sent
        stored_unacknowledged = set(stored) - set(acknowledged)
        # PlaceOrder is write-ahead (services/trading/policy.py EFFECTS): its handler runs only once its event is
        # durable, so not even an order the kill cut off before its answer is stored without its event
        stored_without_event = sorted(set(stored) - set(recorded))
        assert not stored_without_event, (
            f"{len(stored_without_event)} orders stored with no event: {stored_without_event[:10]}"
        )

        # --- the whole log verifies, by the command line ----------------------------------------------------
        async with auth_services.audit_channel("ops", audit_target) as channel:
            audit = audit_pb2_grpc.AuditServiceStub(channel)
            size = await log_size(audit)

            async def signed() -> bool:
                latest = await audit.GetCheckpoint(pb.GetCheckpointRequest(), timeout=CALL_S)
                return latest.checkpoint.tree_size >= size

            await until(signed)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRADEGUARD_")}
        verify = await asyncio.to_thread(
            run_module,
            "tradeguard.cli.main",
            "audit",
            "verify",
            "--home",
            str(home),
            "--target",
            audit_target,
            "--keyvault",
            auth_services.keyvault_target,
            env=env,
        )
        assert verify.returncode == 0, (verify.stdout, verify.stderr)
        assert verify.stdout.startswith(f"ok: {size} entries, "), verify.stdout
    finally:
        for process in reversed(started):
            stop_process(process)  # the killed one has exited already

    print(
        f"\n{len(ledger.sent)} orders sent by {CLIENTS} clients, {len(acknowledged)} acknowledged"
        f" (all recorded and stored); killed with {len(ledger.in_flight_at_kill)} calls in flight,"
        f" {len(killed_in_flight)} of them failed; {len(ledger.failed)} failed in all (UNAVAILABLE),"
        f" {len(failed_with_event)} of them recorded; {len(stored_unacknowledged)} stored unacknowledged"
        f" (each with its event); audit log of {size} entries verified:"
        f" {verify.stdout.strip()}"
    )
