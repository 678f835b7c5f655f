"""The real Envoy (deploy/envoy, rendered with test paths and free loopback ports) in front of the real trading
service over mutual TLS: the JSON API over HTTP/2 and HTTP/1.1, errors as JSON, HSTS on every response (the
edge's own refusals too), TLS 1.2 refused, and what the edge hands the authoriser and the rate limiter.

One Envoy for the module; each test sets how the authoriser and the rate limiter answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from services.trading.service import SERVICE as TRADING
from tests.deploy.edge_support import (
    PRINCIPAL,
    Authorizer,
    Edge,
    RateLimiter,
    public_tls,
    running_edge,
    serving,
    trading_settings,
)
from tradeguard import edge
from tradeguard.mesh import pki
from tradeguard.testing import dev_pki, running_service

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
GET = "/tradeguard.trading.v1.TradingService/GetOrder"
HSTS = "max-age=63072000; includeSubDomains; preload"
ORDER = {
    "account_id": "acct-1",
    "symbol": "BTC-USD",
    "side": "SIDE_BUY",
    "type": "ORDER_TYPE_LIMIT",
    "quantity": "0.5",
    "price": "64000.25",
}


@dataclass
class Stack:
    edge: Edge
    authorizer: Authorizer
    limiter: RateLimiter
    paths: pki.PkiPaths


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    tmp = tmp_path_factory.mktemp("edge")
    paths = dev_pki(tmp / "home", ("ops", "trading", "edge", "auth", "ratelimit"))
    pki.publish_bundle(paths, pki.EDGE, paths.edge_dir)
    settings = trading_settings(paths)
    authorizer, limiter = Authorizer(), RateLimiter()
    add_authorizer = external_auth_pb2_grpc.add_AuthorizationServicer_to_server
    add_limiter = rls_pb2_grpc.add_RateLimitServiceServicer_to_server
    async with (
        running_service(TRADING, settings, paths) as trading,
        serving(paths, "auth", add_authorizer, authorizer) as auth,
        serving(paths, "ratelimit", add_limiter, limiter) as ratelimit,
    ):
        upstreams = {
            "trading": edge.Endpoint("127.0.0.1", trading.port),
            "auth": auth,
            "ratelimit": ratelimit,
        }
        with public_tls(tmp / "public") as (public, _):
            async with running_edge(tmp, paths, public, upstreams) as running:
                yield Stack(running, authorizer, limiter, paths)


@pytest.fixture
def fresh(stack: Stack) -> Stack:
    """The stack with an authoriser that allows, a rate limiter that lets through, and nothing recorded."""
    stack.authorizer.verdict = "allow"
    stack.authorizer.seen.clear()
    stack.limiter.code = rls_pb2.RateLimitResponse.OK
    stack.limiter.seen.clear()
    return stack


def _order(client_order_id: str, **changes: Any) -> dict[str, Any]:
    return {**ORDER, "client_order_id": client_order_id, **changes}


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
async def test_the_json_api_places_and_reads_an_order_through_the_edge(fresh: Stack, http2: bool) -> None:
    async with fresh.edge.client(http2=http2) as client:
        placed = await client.post(PLACE, json=_order(f"json-{http2}"))
        assert placed.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert placed.status_code == 200, placed.text
        assert placed.headers["content-type"] == "application/json"
        assert placed.headers["strict-transport-security"] == HSTS
        order = placed.json()["order"]
        assert (order["client_order_id"], order["status"], order["quantity"]) == (
            f"json-{http2}",
            "ORDER_STATUS_OPEN",
            "0.5",
        )
        read = await client.post(GET, json={"account_id": "acct-1", "order_id": order["order_id"]})
        assert read.status_code == 200, read.text
        assert read.json()["order"] == order


async def test_the_authoriser_gets_the_raw_body_and_the_rate_limiter_the_principal_and_method(
    fresh: Stack,
) -> None:
    body = json.dumps(_order("raw-body")).encode()
    async with fresh.edge.client(http2=True) as client:
        placed = await client.post(PLACE, content=body, headers={"content-type": "application/json"})
    assert placed.status_code == 200, placed.text
    [check] = fresh.authorizer.seen
    http = check.attributes.request.http
    assert (http.method, http.path) == ("POST", PLACE)
    assert http.raw_body == body  # the bytes a signature is over, exactly as sent (pack_as_bytes)
    assert hashlib.sha256(http.raw_body).hexdigest() == hashlib.sha256(body).hexdigest()
    # the authoriser named no API key and no tier: the route's defaults stand in for them
    assert fresh.limiter.seen == [[{"principal": PRINCIPAL, "key": "-", "tier": "-", "method": PLACE}]]


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
async def test_a_rejected_json_order_gets_a_json_error_body(fresh: Stack, http2: bool) -> None:
    async with fresh.edge.client(http2=http2) as client:
        refused = await client.post(PLACE, json=_order("bad-quantity", quantity="-1"))
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json"
    assert refused.headers["strict-transport-security"] == HSTS
    error = refused.json()
    assert error["code"] == 3  # INVALID_ARGUMENT
    assert "quantity" in error["message"]
    by_type = {detail["@type"].rsplit("/", 1)[1]: detail for detail in error["details"]}
    assert by_type["google.rpc.ErrorInfo"]["reason"] == "INVALID_ARGUMENT"
    [violation] = by_type["google.rpc.BadRequest"]["field_violations"]
    assert violation["field"] == "quantity"


async def test_an_order_not_found_is_a_json_404(fresh: Stack) -> None:
    async with fresh.edge.client(http2=True) as client:
        missing = await client.post(
            GET, json={"account_id": "acct-1", "order_id": "ord_00000000000000000000000000"}
        )
    assert missing.status_code == 404
    assert missing.json()["code"] == 5  # NOT_FOUND
    assert missing.headers["strict-transport-security"] == HSTS


async def _status_and_hsts(stack: Stack, path: str, http2: bool) -> tuple[int, httpx.Headers]:
    async with stack.edge.client(http2=http2) as client:
        answer = await client.post(path, json=_order("hsts"))
    return answer.status_code, answer.headers


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
async def test_hsts_on_every_response_the_edges_own_refusals_included(fresh: Stack, http2: bool) -> None:
    seen: dict[str, tuple[int, httpx.Headers]] = {}
    seen["passed"] = await _status_and_hsts(fresh, PLACE, http2)
    seen["unknown path"] = await _status_and_hsts(fresh, "/admin/anything", http2)
    fresh.authorizer.verdict = "401"
    seen["unauthenticated"] = await _status_and_hsts(fresh, PLACE, http2)
    fresh.authorizer.verdict = "403"
    seen["forbidden"] = await _status_and_hsts(fresh, PLACE, http2)
    fresh.authorizer.verdict = "allow"
    fresh.limiter.code = rls_pb2.RateLimitResponse.OVER_LIMIT
    seen["over limit"] = await _status_and_hsts(fresh, PLACE, http2)
    assert {name: status for name, (status, _) in seen.items()} == {
        "passed": 200,
        "unknown path": 404,
        "unauthenticated": 401,
        "forbidden": 403,
        "over limit": 429,
    }
    assert {name: headers.get("strict-transport-security") for name, (_, headers) in seen.items()} == {
        name: HSTS for name in seen
    }
    assert seen["unauthenticated"][1]["www-authenticate"] == "TG1-HMAC-SHA256, Bearer"


async def test_tls_1_2_is_refused(fresh: Stack) -> None:
    context = fresh.edge.tls_context(tls12=True)
    async with httpx.AsyncClient(base_url=fresh.edge.url, verify=context, http2=True) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(PLACE, json=_order("tls12"))
    assert fresh.authorizer.seen == []
    async with fresh.edge.client(http2=True) as client:  # the same client on TLS 1.3 passes
        assert (await client.post(PLACE, json=_order("tls13"))).status_code == 200


async def test_unknown_query_parameters_are_refused(fresh: Stack) -> None:
    async with fresh.edge.client(http2=True) as client:
        refused = await client.post(PLACE, params={"nonsense": "1"}, json=_order("query"))
    assert refused.status_code == 400, refused.text
    assert refused.headers["strict-transport-security"] == HSTS
