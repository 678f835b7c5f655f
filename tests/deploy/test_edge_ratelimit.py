"""Through the real Envoy (deploy/envoy) to the real auth service's ext_authz (with its key vault), the real
rate-limit service's ShouldRateLimit and the real trading service, all over mutual TLS on a dev PKI: HTTPS
clients, over HTTP/2 and HTTP/1.1, get as many orders through as their limit allows, then a 429 with
Retry-After, the RateLimit-* headers and HSTS, and the trading service never sees the refused request.

The limits file is the test's: one order per subject counts against an hour's limit (2 for the `pro` tier, 3 for
the default tier), so the tests count requests, never time. Each test has users and keys of its own (subjects
nobody else counts against); the stack is shared by the module.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2

from services.auth.service import SERVICE as AUTH
from services.ratelimit.model import DEFAULT_BUCKETS
from services.trading.service import SERVICE as TRADING
from tests.deploy.edge_support import Edge, public_tls, running_edge, signed_headers
from tests.services.auth.auth_support import auth_settings, create_user, enrol, login
from tests.support import running_ratelimit
from tests.support_auth import create_hmac_key, keyvault_settings, running_keyvault
from tradeguard import edge
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.ratelimit.v1 import ratelimit_pb2 as rl
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc
from tradeguard.service import read_settings
from tradeguard.testing import dev_pki, running_service

# Each order a distinct one (its quantity): the trading service's default pre-trade checks refuse the same
# order twice within a second (RISK_DUPLICATE_ORDER), as they should.
_DISTINCT = itertools.count(1)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
HSTS = "max-age=63072000; includeSubDomains; preload"
WORKLOADS = ("ops", "trading", "edge", "auth", "ratelimit", "keyvault")
PRO_ORDERS, DEFAULT_ORDERS = 2, 3  # orders per hour, as LIMITS says
# the longest wait the hour's window can give: the window and one bucket (services/ratelimit/model.py: the
# window counts whole buckets, so the oldest counted units leave it up to one bucket after the window)
LONGEST_WAIT_S = 3600 + 3600 // DEFAULT_BUCKETS
LIMITS = f"""
version: 1
default_tier: standard
operations:
  default: {{requests: 1}}
  {PLACE}: {{requests: 1, orders: 1}}
tiers:
  standard:
    requests: [{{name: per-hour, limit: 1000, window: 1h}}]
    orders: [{{name: per-hour, limit: {DEFAULT_ORDERS}, window: 1h}}]
  pro:
    requests: [{{name: per-hour, limit: 1000, window: 1h}}]
    orders: [{{name: per-hour, limit: {PRO_ORDERS}, window: 1h}}]
"""
RATE_LIMIT_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")


@dataclass
class Person:
    user: Any  # pb.User
    key_id: str  # an HMAC API key of the user's
    secret: str
    access_token: str  # the user's, from a login through the edge's auth service

    def order(self, client_order_id: str) -> bytes:
        return json.dumps(
            {
                "account_id": self.user.account_id,
                "client_order_id": client_order_id,
                "symbol": "BTC-USD",
                "side": "SIDE_BUY",
                "type": "ORDER_TYPE_LIMIT",
                "quantity": f"0.5{next(_DISTINCT):04d}",
                "price": "64000.25",
            }
        ).encode()


@dataclass
class Stack:
    edge: Edge
    people: Any  # auth stub as the edge (enrolment, login)
    ops: Any  # auth stub as ops (users, keys)
    quotas: Any  # rate-limit stub as ops (GetQuota)
    names: itertools.count[int] = field(default_factory=itertools.count)

    async def person(self, tier: str) -> Person:
        """A new trader with TOTP, logged in, and an HMAC API key of `tier` for it."""
        name = f"trader{next(self.names)}"
        user = await create_user(self.ops, name)
        totp, _ = await enrol(self.people, name)
        tokens = await login(self.people, name, totp)
        key = await create_hmac_key(
            self.ops,
            user.user_id,
            ["orders:write", "orders:read"],
            ip_allow_list=["127.0.0.0/8"],
            tier=tier,
            lifetime=duration_pb2.Duration(seconds=86400),
            label="rate-limit edge test",
        )
        assert key.secret is not None
        return Person(user, key.key_id, key.secret, tokens.access_token)

    def trading_requests(self) -> int:
        return self.edge.counter("cluster.trading.upstream_rq_total")

    async def remaining(self, subject: str, tier: str) -> int:
        """What the rate-limit service says is left of the subject's orders this hour (nothing consumed)."""
        reply = await self.quotas.GetQuota(
            rl.GetQuotaRequest(check=rl.QuotaCheck(subject=subject, tier=tier, operation=PLACE)), timeout=10
        )
        [orders] = [limit for limit in reply.decision.limits if limit.group == "orders"]
        return int(orders.remaining)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("edge-ratelimit")
    home = tmp / "home"
    paths = dev_pki(home, WORKLOADS)
    pki.publish_bundle(paths, pki.EDGE, paths.edge_dir)
    async with (
        running_keyvault(paths, keyvault_settings(home, "edge test passphrase")) as keyvault,
        running_service(AUTH, auth_settings(keyvault), paths) as auth,
        running_ratelimit(paths, LIMITS) as ratelimit,
    ):
        environ = {
            "TRADEGUARD_HOME": str(home),
            "TRADEGUARD_TRADING_PORT": "0",
            "TRADEGUARD_TRADING_AUTH_TARGET": auth.target,
            # its guard's quota stage: edge calls skip it (Envoy counted them); the exact counts below would
            # show a second count
            "TRADEGUARD_TRADING_RATELIMIT_TARGET": ratelimit.target,
            # the audit stage off: these tests are about the edge (the stage is tested against the real audit
            # service in tests/tradeguard/guard/test_audit.py)
            "TRADEGUARD_TRADING_AUDIT": "false",
        }
        trading_settings = read_settings(TRADING, environ)
        trading_settings = replace(trading_settings, server=replace(trading_settings.server, grace_s=1.0))
        async with (
            running_service(TRADING, trading_settings, paths) as trading,
            auth.channel("edge") as as_edge,
            auth.channel("ops") as as_ops,
            ratelimit.channel("ops") as ratelimit_ops,
        ):
            upstreams = {
                "trading": edge.Endpoint("127.0.0.1", trading.port),
                "auth": edge.Endpoint("127.0.0.1", auth.port),
                "ratelimit": edge.Endpoint("127.0.0.1", ratelimit.port),
            }
            with public_tls(tmp / "public") as (public, _):
                async with running_edge(tmp, paths, public, upstreams) as running:
                    yield Stack(
                        running,
                        auth_pb2_grpc.AuthServiceStub(as_edge),
                        auth_pb2_grpc.AuthServiceStub(as_ops),
                        ratelimit_pb2_grpc.RateLimitServiceStub(ratelimit_ops),
                    )


def _once(answer: httpx.Response, name: str) -> str:
    """The one value of header `name` (a second one would be a duplicate the client must not have to resolve)."""
    values = answer.headers.get_list(name)
    assert len(values) == 1, (name, values)
    return values[0]


def _seconds(value: str) -> int:
    assert value.isdigit(), value  # whole seconds, as delta-seconds (RFC 9110), never a date or a fraction
    return int(value)


def assert_allowed(answer: httpx.Response, limit: int, remaining: int) -> None:
    assert answer.status_code == 200, answer.text
    assert _once(answer, "strict-transport-security") == HSTS
    assert (_once(answer, "ratelimit-limit"), _once(answer, "ratelimit-remaining")) == (
        str(limit),
        str(remaining),
    )
    assert 1 <= _seconds(_once(answer, "ratelimit-reset")) <= LONGEST_WAIT_S
    assert "retry-after" not in answer.headers


def assert_limited(answer: httpx.Response, limit: int) -> None:
    """A 429 with Retry-After (whole seconds, at least 1, at most the hour's window and a bucket), the RateLimit-* headers
    of the limit that refused, HSTS, none of Envoy's own rate-limit headers beside them, and a JSON body in the
    shape of a transcoded gRPC error (RESOURCE_EXHAUSTED, its retry delay the Retry-After)."""
    assert answer.status_code == 429, answer.text
    assert _once(answer, "strict-transport-security") == HSTS
    assert 1 <= _seconds(_once(answer, "retry-after")) <= LONGEST_WAIT_S
    assert (_once(answer, "ratelimit-limit"), _once(answer, "ratelimit-remaining")) == (str(limit), "0")
    assert 1 <= _seconds(_once(answer, "ratelimit-reset")) <= LONGEST_WAIT_S
    assert not [name for name in answer.headers if name.startswith(("x-ratelimit-", "x-envoy-"))]
    assert _once(answer, "content-type") == "application/json"
    body = answer.json()
    assert body["code"] == 8 and body["details"][0]["reason"] == "RATE_LIMITED"
    assert body["details"][1]["retry_delay"] == f"{_once(answer, 'retry-after')}s"


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
async def test_a_signed_key_past_its_limit_gets_429_with_retry_after_and_ratelimit_headers(
    stack: Stack, http2: bool
) -> None:
    trader = await stack.person(tier="pro")
    before = stack.trading_requests()
    over_before = stack.edge.counter("cluster.trading.ratelimit.over_limit")
    async with stack.edge.client(http2=http2) as client:

        async def place(n: int) -> httpx.Response:
            body = trader.order(f"signed-{n}")
            headers = signed_headers(trader.key_id, trader.secret, PLACE, body)
            return await client.post(PLACE, content=body, headers=headers)

        passed = [await place(n) for n in range(PRO_ORDERS)]
        refused = await place(PRO_ORDERS)
        assert refused.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    for n, answer in enumerate(passed):
        assert_allowed(answer, PRO_ORDERS, PRO_ORDERS - 1 - n)
        assert answer.json()["order"]["client_order_id"] == f"signed-{n}"
    assert_limited(refused, PRO_ORDERS)
    # the rate-limit service refused the third, and it never reached the trading service
    assert stack.edge.counter("cluster.trading.ratelimit.over_limit") - over_before == 1
    assert stack.trading_requests() - before == PRO_ORDERS
    # counted against the key, under its tier's limit
    assert await stack.remaining(f"key:{trader.key_id}", "pro") == 0


async def test_a_bearer_client_is_limited_as_its_user_apart_from_the_users_api_key(stack: Stack) -> None:
    """A bearer token names no key and no tier: the user is the subject, under the default tier's limit; the
    user's API key (tier pro) keeps its own count."""
    trader = await stack.person(tier="pro")
    before = stack.trading_requests()
    bearer = {"content-type": "application/json", "authorization": f"Bearer {trader.access_token}"}
    async with stack.edge.client(http2=True) as client:
        passed = [
            await client.post(PLACE, content=trader.order(f"bearer-{n}"), headers=bearer)
            for n in range(DEFAULT_ORDERS)
        ]
        refused = await client.post(PLACE, content=trader.order("bearer-over"), headers=bearer)
        body = trader.order("signed-after")
        signed = await client.post(
            PLACE, content=body, headers=signed_headers(trader.key_id, trader.secret, PLACE, body)
        )
    for n, answer in enumerate(passed):
        assert_allowed(answer, DEFAULT_ORDERS, DEFAULT_ORDERS - 1 - n)
    assert_limited(refused, DEFAULT_ORDERS)
    assert_allowed(signed, PRO_ORDERS, PRO_ORDERS - 1)  # the key's count is its own
    assert stack.trading_requests() - before == DEFAULT_ORDERS + 1
    assert await stack.remaining(f"user:{trader.user.user_id}", "") == 0
    assert await stack.remaining(f"key:{trader.key_id}", "pro") == PRO_ORDERS - 1


async def test_a_key_of_a_tier_the_limits_file_does_not_name_gets_the_default_tier(stack: Stack) -> None:
    trader = await stack.person(tier="gold")
    async with stack.edge.client(http2=True) as client:
        answers = []
        for n in range(DEFAULT_ORDERS + 1):
            body = trader.order(f"gold-{n}")
            headers = signed_headers(trader.key_id, trader.secret, PLACE, body)
            answers.append(await client.post(PLACE, content=body, headers=headers))
    for n, answer in enumerate(answers[:-1]):
        assert_allowed(answer, DEFAULT_ORDERS, DEFAULT_ORDERS - 1 - n)
    assert_limited(answers[-1], DEFAULT_ORDERS)
