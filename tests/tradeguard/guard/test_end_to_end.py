"""The guard end to end with the real services over mutual TLS: key vault → auth → trading behind its guard.

A trader enrols TOTP and logs in (a certificate-bound JWT), an operator creates them an HMAC API key; orders are
placed with both, only for the trader's own account; a token or key revoked at the auth service is refused by the
running trading guard within one second (measured).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import pytest

from services.trading.service import SERVICE as TRADING
from services.trading.settings import Settings as TradingSettings
from tests.services.auth.auth_support import create_user, enrol, login
from tests.support import AuthServices
from tests.support_auth import create_hmac_key, real_auth
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.guard import Guard, GuardSettings
from tradeguard.guard.client import (
    authenticated_channel,
    bearer_interceptors,
    signing_interceptors,
)
from tradeguard.mesh import pki, tls
from tradeguard.mesh.server import ServerConfig
from tradeguard.testing import RunningService, eventually, running_service
from tradeguard.trading.v1 import trading_pb2, trading_pb2_grpc


@dataclass
class Suite:
    paths: pki.PkiPaths
    auth: RunningService[Any, Any]
    trading: RunningService[TradingSettings, Any]
    guard: Guard

    def trading_channel(
        self, authentication: list[grpc.aio.ClientInterceptor], caller: str = "ops"
    ) -> grpc.aio.Channel:
        return authenticated_channel(
            self.trading.target, "trading", tls.Workload.of(self.paths, caller), authentication
        )


@pytest.fixture
async def suite(pki_paths: pki.PkiPaths, auth_services: AuthServices) -> AsyncIterator[Suite]:
    pki.issue(pki_paths, "trading-client")
    home = pki_paths.home
    async with real_auth(pki_paths) as real:
        trading_settings = TradingSettings(
            server=ServerConfig(name="trading", port=0, home=home, grace_s=1.0),
            database_url=f"sqlite:///{home / 'data' / 'trading.db'}",
            # issuer and audience: the auth service's defaults; calls counted by the session's rate limiter
            guard=GuardSettings(
                auth_target=real.target,
                ratelimit_target=auth_services.ratelimit_target,
                audit_target=auth_services.audit_target,
            ),
        )
        async with running_service(TRADING, trading_settings, pki_paths) as trading:
            guard = trading.running.assembly.layers[0]
            assert isinstance(guard, Guard)
            await eventually(lambda: guard.revocations.is_up, 10)
            yield Suite(pki_paths, real.auth, trading, guard)


def order(coid: str, account: str = "") -> trading_pb2.PlaceOrderRequest:
    return trading_pb2.PlaceOrderRequest(
        account_id=account,
        client_order_id=coid,
        symbol="BTC-USD",
        side=trading_pb2.SIDE_BUY,
        type=trading_pb2.ORDER_TYPE_LIMIT,
        quantity="1",
        price="100",
    )


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code()


async def test_a_trader_places_orders_with_a_jwt_and_a_signed_key_for_their_account_only(
    suite: Suite,
) -> None:
    async with suite.auth.channel("ops") as ops_channel:
        ops = auth_pb2_grpc.AuthServiceStub(ops_channel)
        alice = await create_user(ops, "alice")
        await create_user(ops, "bob")
        totp, _ = await enrol(ops, "alice")
        tokens = await login(ops, "alice", totp)  # bound to the ops certificate that logged in
        key = await create_hmac_key(ops, alice.user_id, ["orders:read", "orders:write"])
    async with (
        suite.trading_channel(bearer_interceptors(tokens.access_token)) as by_token,
        suite.trading_channel(signing_interceptors(key), caller="trading-client") as by_key,
        suite.trading_channel(bearer_interceptors(tokens.access_token), caller="monitor") as other_cert,
    ):
        with_token = trading_pb2_grpc.TradingServiceStub(by_token)
        with_key = trading_pb2_grpc.TradingServiceStub(by_key)
        first = (await with_token.PlaceOrder(order("jwt-1"), timeout=10)).order
        second = (await with_key.PlaceOrder(order("key-1", alice.account_id), timeout=10)).order
        assert first.account_id == second.account_id == alice.account_id
        listed = await with_key.ListOrders(trading_pb2.ListOrdersRequest(), timeout=10)
        assert {o.order_id for o in listed.orders} == {first.order_id, second.order_id}
        assert await code_of(with_key.PlaceOrder(order("key-2", "acct-bob"), timeout=10)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # the token is bound to the certificate that logged in: from another workload's it is refused
        stolen = trading_pb2_grpc.TradingServiceStub(other_cert).ListOrders(
            trading_pb2.ListOrdersRequest(), timeout=10
        )
        assert await code_of(stolen) == grpc.StatusCode.UNAUTHENTICATED
    assert suite.guard.signed.batcher.batches >= 1  # signed calls went through the guard's batcher


async def test_revoked_tokens_and_keys_are_refused_by_the_running_guard_within_one_second(
    suite: Suite,
) -> None:
    async with suite.auth.channel("ops") as ops_channel:
        ops = auth_pb2_grpc.AuthServiceStub(ops_channel)
        carol = await create_user(ops, "carol")
        totp, _ = await enrol(ops, "carol")
        tokens = await login(ops, "carol", totp)
        key = await create_hmac_key(ops, carol.user_id, ["orders:read"])
        jti = jwt.decode(tokens.access_token, options={"verify_signature": False})["jti"]
        async with (
            suite.trading_channel(bearer_interceptors(tokens.access_token)) as by_token,
            suite.trading_channel(signing_interceptors(key), caller="trading-client") as by_key,
        ):
            with_token = trading_pb2_grpc.TradingServiceStub(by_token)
            with_key = trading_pb2_grpc.TradingServiceStub(by_key)
            await with_token.ListOrders(trading_pb2.ListOrdersRequest(), timeout=10)  # verified, now cached
            await with_key.ListOrders(trading_pb2.ListOrdersRequest(), timeout=10)
            revocations = suite.guard.revocations

            started = time.monotonic()
            await ops.RevokeTokens(pb.RevokeTokensRequest(jti=jti), timeout=10)
            await eventually(lambda: revocations.token_revoked(jti, None, carol.user_id, 0) is not None, 5)
            measured = time.monotonic() - started
            assert measured < 1.0, f"the token's revocation took {measured:.3f} s to reach the guard"
            refused = with_token.ListOrders(trading_pb2.ListOrdersRequest(), timeout=10)
            assert await code_of(refused) == grpc.StatusCode.UNAUTHENTICATED

            started = time.monotonic()
            await ops.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.key_id), timeout=10)
            await eventually(lambda: revocations.key_revoked(key.key_id), 5)
            measured = time.monotonic() - started
            assert measured < 1.0, f"the key's revocation took {measured:.3f} s to reach the guard"
            refused = with_key.ListOrders(trading_pb2.ListOrdersRequest(), timeout=10)
            assert await code_of(refused) == grpc.StatusCode.UNAUTHENTICATED
