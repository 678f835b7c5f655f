"""SIGTERM under load: every order the service acknowledged is still there after a restart.

The trading service runs as a process whose guard verifies tokens at the session's real auth service, counts
calls at its rate-limit service and records them at its audit service (tests/conftest.py `auth_services`); the load is placed with the access token of a trader who logged in there."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import AuthServices, create_auth_user, free_port, log_in
from tradeguard.guard.client import authenticated_channel, bearer_interceptors
from tradeguard.mesh import pki, tls
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc


def start_trading(home: Path, port: int, auth: AuthServices) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        TRADEGUARD_HOME=str(home),
        TRADEGUARD_TRADING_PORT=str(port),
        # the guard verifies tokens against this auth service (issuer and audience: its defaults)
        TRADEGUARD_TRADING_AUTH_TARGET=auth.auth_target,
        # and counts calls at the session's rate-limit service (generous limits: the load is never refused)
        TRADEGUARD_TRADING_RATELIMIT_TARGET=auth.ratelimit_target,
        # and records every call at the session's audit service (an order is acknowledged once its event is durable)
        TRADEGUARD_TRADING_AUDIT_TARGET=auth.audit_target,
        # a load of one account at one price: the shutdown is under test, not the risk checks
        TRADEGUARD_TRADING_RISK="0",
    )
    with open(home / "trading.log", "ab") as log:  # a file, not a pipe: a full pipe would block the service
        return subprocess.Popen([sys.executable, "-m", "services.trading"], env=env, stdout=log, stderr=log)


async def wait_serving(target: str, workload: tls.Workload, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(150):
        assert proc.poll() is None, "trading service exited during start-up"
        try:
            async with grpc.aio.secure_channel(
                target,
                tls.channel_credentials(workload),
                options=[("grpc.ssl_target_name_override", "trading")],
            ) as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("trading service did not become ready")


async def wait_guarded(stub: trading_pb2_grpc.TradingServiceAsyncStub) -> None:
    """Until the guard accepts tokens (its revocation stream is up, moments after the server is)."""
    for _ in range(150):
        try:
            await stub.ListOrders(trading_pb2.ListOrdersRequest(page_size=1), timeout=5)
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
        await asyncio.sleep(0.1)
    raise AssertionError("the guard never accepted the token")


@pytest.mark.slow
async def test_sigterm_during_load_loses_no_acknowledged_order(
    pki_paths: pki.PkiPaths, auth_services: AuthServices
) -> None:
    await _sigterm_during_load(pki_paths, auth_services)


async def _sigterm_during_load(pki_paths: pki.PkiPaths, auth: AuthServices) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    ops = tls.Workload.of(pki_paths, "ops")
    trader = await create_auth_user(auth, "acct-load")  # a trader: orders:read, orders:write
    jwt = await log_in(auth, trader, "ops")  # bound to the ops certificate the calls present
    proc = start_trading(pki_paths.home, port, auth)
    acked: list[str] = []
    refused: list[grpc.StatusCode] = []
    unanswered: list[trading_pb2.PlaceOrderRequest] = []
    try:
        await wait_serving(target, ops, proc)
        async with authenticated_channel(target, "trading", ops, bearer_interceptors(jwt)) as channel:
            stub = trading_pb2_grpc.TradingServiceStub(channel)
            await wait_guarded(stub)
            stop = asyncio.Event()

            async def worker(w: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    request = trading_pb2.PlaceOrderRequest(
                        account_id="acct-load",
                        client_order_id=f"w{w}-{n}",
                        symbol="ETH-USD",
                        side=trading_pb2.SIDE_SELL,
                        type=trading_pb2.ORDER_TYPE_LIMIT,
                        quantity="1",
                        price="3000",
                    )
                    try:
                        reply = await stub.PlaceOrder(request, timeout=5)
                    except grpc.aio.AioRpcError as error:
                        refused.append(error.code())
                        unanswered.append(request)
                        stop.set()
                        return
                    acked.append(reply.order.order_id)

            workers = [asyncio.create_task(worker(w)) for w in range(16)]
            await asyncio.sleep(0.8)
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*workers), timeout=20)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0
        assert len(acked) > 50
        # Calls caught by the stop are not acknowledged: refused (UNAVAILABLE, CANCELLED) or, on a loaded
        # machine, timed out (DEADLINE_EXCEEDED). For a trading client each is "outcome unknown": it retries
        # with the same client_order_id (below), which places the order at most once.
        assert set(refused) <= {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc = start_trading(pki_paths.home, port, auth)
    try:
        await wait_serving(target, ops, proc)
        async with authenticated_channel(target, "trading", ops, bearer_interceptors(jwt)) as channel:
            stub = trading_pb2_grpc.TradingServiceStub(channel)
            await wait_guarded(stub)
            stored: set[str] = set()
            token = ""
            while True:
                page = await stub.ListOrders(
                    trading_pb2.ListOrdersRequest(account_id="acct-load", page_size=500, page_token=token),
                    timeout=10,
                )
                stored.update(o.order_id for o in page.orders)
                token = page.next_page_token
                if not token:
                    break
            # a refused request is retried with its client_order_id: placed once, whether or not it got in
            for request in unanswered:
                reply = await stub.PlaceOrder(request, timeout=10)
                assert reply.order.client_order_id == request.client_order_id
        assert set(acked) <= stored
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
