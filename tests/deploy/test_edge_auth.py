"""Through the real Envoy to the real auth service's ext_authz, the real rate-limit service (its packaged default
limits) and on to the real trading service (with its guard), everything over mutual TLS on a dev PKI, the key
vault holding the auth service's keys: a signed JSON order and a Bearer order pass, each counted by the rate
limiter against who the auth service said it is (the key; the user); a bad signature, a replayed nonce and a
missing credential are 401 with WWW-Authenticate and HSTS, before the rate limiter or the trading service sees
anything. (Limits reached through the edge: test_edge_ratelimit.py.)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2

from services.auth.service import SERVICE as AUTH
from services.trading.service import SERVICE as TRADING
from tests.deploy.edge_support import Edge, public_tls, running_edge, signed_headers
from tests.services.auth.auth_support import auth_settings, create_user, enrol, login
from tests.support import PACKAGED_LIMITS, running_ratelimit
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

pytestmark = pytest.mark.slow

PLACE = "/tradeguard.trading.v1.TradingService/PlaceOrder"
HSTS = "max-age=63072000; includeSubDomains; preload"
WORKLOADS = ("ops", "trading", "edge", "auth", "ratelimit", "keyvault")


@dataclass
class Suite:
    edge: Edge
    quotas: Any  # the rate-limit service's stub, as ops
    user: Any  # pb.User
    key_id: str
    secret: str
    access_token: str

    async def orders_left_today(self, subject: str, tier: str) -> tuple[int, int]:
        """(limit, remaining) of the subject's per-day orders, as the rate-limit service counts them."""
        reply = await self.quotas.GetQuota(
            rl.GetQuotaRequest(check=rl.QuotaCheck(subject=subject, tier=tier, operation=PLACE)), timeout=10
        )
        [day] = [s for s in reply.decision.limits if (s.group, s.name) == ("orders", "per-day")]
        return int(day.limit), int(day.remaining)


def _order(client_order_id: str) -> bytes:
    return json.dumps(
        {
            "account_id": "acct-alice",
            "client_order_id": client_order_id,
            "symbol": "BTC-USD",
            "side": "SIDE_BUY",
            "type": "ORDER_TYPE_LIMIT",
            "quantity": f"0.5{next(_DISTINCT):04d}",
            "price": "64000.25",
        }
    ).encode()


async def _people(channel: Any, ops_channel: Any) -> tuple[Any, str, str, str]:
    """A trader with TOTP, logged in (as the edge forwards a login: tokens not bound to a mesh certificate), and
    an HMAC API key for it: (user, key id, secret, access token)."""
    ops = auth_pb2_grpc.AuthServiceStub(ops_channel)
    people = auth_pb2_grpc.AuthServiceStub(channel)
    user = await create_user(ops, "alice")
    totp, _ = await enrol(people, "alice")
    tokens = await login(people, "alice", totp)
    key = await create_hmac_key(
        ops,
        user.user_id,
        ["orders:write", "orders:read"],
        ip_allow_list=["127.0.0.0/8"],
        tier="pro",
        lifetime=duration_pb2.Duration(seconds=86400),
        label="edge test",
    )
    assert key.secret is not None
    return user, key.key_id, key.secret, tokens.access_token


@pytest.fixture
async def suite(tmp_path: Path) -> AsyncIterator[Suite]:
    home = tmp_path / "home"
    paths = dev_pki(home, WORKLOADS)
    pki.publish_bundle(paths, pki.EDGE, paths.edge_dir)
    vault_settings = keyvault_settings(home, "edge test passphrase")
    async with (
        running_keyvault(paths, vault_settings) as keyvault,
        running_service(AUTH, auth_settings(keyvault), paths) as auth,
        running_ratelimit(paths, PACKAGED_LIMITS.read_text()) as ratelimit,
    ):
        environ = {
            "TRADEGUARD_HOME": str(home),
            "TRADEGUARD_TRADING_PORT": "0",
            "TRADEGUARD_TRADING_AUTH_TARGET": auth.target,
            "TRADEGUARD_TRADING_RATELIMIT_TARGET": ratelimit.target,  # its guard's (edge calls skip it)
            # the audit stage off: these tests are about the edge (the stage is tested against the real audit
            # service in tests/tradeguard/guard/test_audit.py)
            "TRADEGUARD_TRADING_AUDIT": "false",
        }
        trading_settings = read_settings(TRADING, environ)
        trading_settings = replace(trading_settings, server=replace(trading_settings.server, grace_s=1.0))
        async with (
            running_service(TRADING, trading_settings, paths) as trading,
            ratelimit.channel("ops") as ratelimit_ops,
            auth.channel("edge") as as_edge,
            auth.channel("ops") as as_ops,
        ):
            user, key_id, secret, token = await _people(as_edge, as_ops)
            upstreams = {
                "trading": edge.Endpoint("127.0.0.1", trading.port),
                "auth": edge.Endpoint("127.0.0.1", auth.port),
                "ratelimit": edge.Endpoint("127.0.0.1", ratelimit.port),
            }
            quotas = ratelimit_pb2_grpc.RateLimitServiceStub(ratelimit_ops)
            with public_tls(tmp_path / "public") as (public, _):
                async with running_edge(tmp_path, paths, public, upstreams) as running:
                    yield Suite(running, quotas, user, key_id, secret, token)


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1.1"])
async def test_a_signed_json_order_and_a_bearer_order_pass_through_the_edge(
    suite: Suite, http2: bool
) -> None:
    async with suite.edge.client(http2=http2) as client:
        body = _order(f"signed-{http2}")
        signed = await client.post(
            PLACE, content=body, headers=signed_headers(suite.key_id, suite.secret, PLACE, body)
        )
        assert signed.status_code == 200, signed.text
        assert signed.headers["strict-transport-security"] == HSTS
        order = signed.json()["order"]
        assert (order["account_id"], order["client_order_id"]) == ("acct-alice", f"signed-{http2}")

        bearer = await client.post(
            PLACE,
            content=_order(f"bearer-{http2}"),
            headers={"content-type": "application/json", "authorization": f"Bearer {suite.access_token}"},
        )
        assert bearer.status_code == 200, bearer.text
        assert bearer.headers["strict-transport-security"] == HSTS
        assert bearer.json()["order"]["account_id"] == "acct-alice"
        for answer in (signed, bearer):
            assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(answer.headers)
    # the rate limiter counted each against who the auth service said it is: the signed order against the key
    # (its tier, pro), the bearer order against the user (no tier: the default)
    limit, left = await suite.orders_left_today(f"key:{suite.key_id}", "pro")
    assert left == limit - 1
    limit, left = await suite.orders_left_today(f"user:{suite.user.user_id}", "")
    assert left == limit - 1


async def test_a_bad_signature_a_replay_and_no_credential_are_401_with_www_authenticate(suite: Suite) -> None:
    body = _order("refused")
    good = signed_headers(suite.key_id, suite.secret, PLACE, body)
    async with suite.edge.client(http2=True) as client:
        passed = await client.post(PLACE, content=body, headers=good)
        answers = {
            "bad signature": await client.post(
                PLACE,
                content=body,
                headers=signed_headers(
                    suite.key_id, suite.secret, PLACE, body, **{"x-tg-signature": "0" * 64}
                ),
            ),
            "altered body": await client.post(PLACE, content=body.replace(b"0.5", b"5.0"), headers=good),
            "replayed nonce": await client.post(PLACE, content=body, headers=good),
            "no credential": await client.post(
                PLACE, content=body, headers={"content-type": "application/json"}
            ),
            "bad token": await client.post(
                PLACE, content=body, headers={"authorization": f"Bearer {suite.access_token[:-4]}AAAA"}
            ),
        }
    assert passed.status_code == 200, passed.text
    for name, answer in answers.items():
        assert answer.status_code == 401, (name, answer.status_code, answer.text)
        assert "TG1-HMAC-SHA256" in answer.headers["www-authenticate"], name
        assert answer.headers["strict-transport-security"] == HSTS, name
        assert answer.json()["code"] == 16, name  # UNAUTHENTICATED, as a JSON error body
    # only the good one reached the rate limiter (Envoy counts its answers under the route's cluster) and trading
    assert suite.edge.counter("cluster.trading.ratelimit.ok") == 1
    assert suite.edge.counter("cluster.trading.upstream_rq_total") == 1
    limit, left = await suite.orders_left_today(f"key:{suite.key_id}", "pro")
    assert left == limit - 1
