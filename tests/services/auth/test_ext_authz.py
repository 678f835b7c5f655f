"""Envoy's ext_authz Check, served by the real auth service over mutual TLS, with CheckRequests shaped as Envoy
1.40 sends them for deploy/envoy/edge.yaml (headers map, `with_request_body.pack_as_bytes` → raw_body, the
connection's address as the source): signed JSON orders and Bearer orders pass with the identity headers and the
rate limiter's metadata; each misuse is a 401 with WWW-Authenticate or a 403, with a JSON error body; every answer
carries HSTS. Only the edge may ask."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import grpc
import jwt
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf import json_format, timestamp_pb2

from services.auth.ext_authz import Routes, request_headers
from services.auth.service import SERVICE
from services.auth.settings import DEFAULT_HSTS, DEFAULT_ROUTE_PERMISSIONS
from services.keyvault.settings import Settings as KeyVaultSettings
from tests.services.auth.auth_support import (
    PASSWORD,
    PLACE_ORDER,
    AuthService,
    auth,
    auth_settings,
    create_user,
    enrol,
    next_code,
    stub,
)
from tests.support import free_port
from tradeguard import signing
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.mesh import pki
from tradeguard.testing import RunningService, running_service

__all__ = ["auth"]  # the fixture, imported for pytest

LIST_ORDERS = "/tradeguard.trading.v1.TradingService/ListOrders"
CLIENT_IP = "203.0.113.7"
ORDER = json.dumps(
    {
        "account_id": "acct-ivy",
        "client_order_id": "c-1",
        "symbol": "BTC-USD",
        "side": "SIDE_BUY",
        "quantity": "0.5",
    },
    separators=(",", ":"),
).encode()
IDENTITY = ("x-tg-principal", "x-tg-account", "x-tg-scopes", "x-tg-key", "x-tg-tier")


def envoy_check(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes = b"",
    *,
    source_ip: str = CLIENT_IP,
    certificate: str = "",
    raw: bool = True,
) -> ext.CheckRequest:
    """A CheckRequest as Envoy sends it: pseudo-headers in the map, the body as bytes (`raw`) or as text."""
    all_headers = {
        ":authority": "api.tradeguard.example",
        ":method": method,
        ":path": path,
        ":scheme": "https",
        "user-agent": "httpx/0.28",
        "x-forwarded-proto": "https",
        "x-request-id": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        **headers,
    }
    if body:
        all_headers["content-type"] = "application/json"
        all_headers["content-length"] = str(len(body))
    http = attrs.AttributeContext.HttpRequest(
        id="4785619318826362811",
        method=method,
        headers=all_headers,
        path=path,
        host="api.tradeguard.example",
        scheme="https",
        size=len(body) if body else -1,
        protocol="HTTP/2",
    )
    if raw:
        http.raw_body = body
    else:
        http.body = body.decode()
    now = time.time()
    return ext.CheckRequest(
        attributes=attrs.AttributeContext(
            source=attrs.AttributeContext.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=source_ip, port_value=51234)
                ),
                certificate=certificate,
            ),
            destination=attrs.AttributeContext.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="10.0.0.5", port_value=8443)
                )
            ),
            request=attrs.AttributeContext.Request(
                time=timestamp_pb2.Timestamp(seconds=int(now), nanos=int(now % 1 * 1e9)), http=http
            ),
            tls_session=attrs.AttributeContext.TLSSession(sni="api.tradeguard.example"),
        )
    )


def signed_headers(key_id: str, secret: str, path: str, body: bytes, **extra: str) -> dict[str, str]:
    return {
        **dict(
            signing.signed_headers(
                signing.Scheme.HMAC_SHA256,
                secret,
                key_id,
                int(time.time() * 1000),
                secrets.token_urlsafe(24),
                path,
                body,
            )
        ),
        **extra,
    }


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def headers_of(options: Any) -> dict[str, str]:
    return {option.header.key: option.header.value for option in options}


def assert_ok(response: ext.CheckResponse) -> dict[str, str]:
    assert response.status.code == 0, response
    assert response.WhichOneof("http_response") == "ok_response"
    assert headers_of(response.ok_response.response_headers_to_add) == {
        "strict-transport-security": DEFAULT_HSTS
    }
    for option in response.ok_response.headers:  # overwrite what a client sent, never append to it
        assert option.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return headers_of(response.ok_response.headers)


def assert_denied(response: ext.CheckResponse, status: int) -> dict[str, Any]:
    assert response.WhichOneof("http_response") == "denied_response", response
    denied = response.denied_response
    assert denied.status.code == status
    headers = headers_of(denied.headers)
    assert headers["strict-transport-security"] == DEFAULT_HSTS
    assert headers["content-type"] == "application/json"
    if status == 401:
        assert headers["www-authenticate"] == "TG1-HMAC-SHA256, Bearer"
        assert response.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    else:
        assert "www-authenticate" not in headers
    body: dict[str, Any] = json.loads(denied.body)
    return body


class Edge:
    """The auth service as Envoy reaches it (workload `edge`), with a user and API keys made by ops."""

    def __init__(self, auth_service: AuthService) -> None:
        self.auth = auth_service

    async def __aenter__(self) -> Edge:
        self._edge = self.auth.channel("edge")
        self._ops = self.auth.channel("ops")
        self.check_stub = external_auth_pb2_grpc.AuthorizationStub(self._edge)
        self.ops = stub(self._ops)
        self.edge = stub(self._edge)
        self.user = await create_user(self.ops, "ivy")
        self.viewer = await create_user(self.ops, "jack", roles=("viewer",))
        self.key_id, self.secret = await self.key(["orders:read", "orders:write"], tier="pro")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._edge.close()
        await self._ops.close()

    async def key(
        self, scopes: list[str], tier: str = "standard", cidrs: tuple[str, ...] = ()
    ) -> tuple[str, str]:
        created = await self.ops.CreateApiKey(
            pb.CreateApiKeyRequest(
                user_id=self.user.user_id,
                kind=pb.API_KEY_KIND_HMAC,
                scopes=scopes,
                tier=tier,
                ip_allow_list=list(cidrs),
            ),
            timeout=10,
        )
        return created.key.key_id, created.secret

    async def check(self, request: ext.CheckRequest) -> ext.CheckResponse:
        response = await self.check_stub.Check(request, timeout=10)
        assert isinstance(response, ext.CheckResponse)
        return response


@pytest.fixture
async def edge(auth: AuthService) -> Any:
    async with Edge(auth) as connected:
        yield connected


async def test_a_signed_json_order_passes_with_identity_headers_and_metadata(edge: Edge) -> None:
    sent = signed_headers(
        edge.key_id,
        edge.secret,
        PLACE_ORDER,
        ORDER,
        **{"x-tg-principal": "usr_someone_else", "x-tg-account": "acct-victim", "x-tg-admin": "yes"},
    )
    response = await edge.check(envoy_check("POST", PLACE_ORDER, sent, ORDER))
    upstream = assert_ok(response)
    assert upstream == {
        "x-tg-principal": edge.user.user_id,  # the verified user, whatever the client claimed
        "x-tg-account": "acct-ivy",
        "x-tg-scopes": "orders:read orders:write",
        "x-tg-key": edge.key_id,
        "x-tg-tier": "pro",
    }
    # Every other x-tg-* header the client sent, and its credentials, go no further.
    assert set(response.ok_response.headers_to_remove) == {
        "x-tg-admin",
        "x-tg-nonce",
        "x-tg-signature",
        "x-tg-timestamp",
    }
    assert json_format.MessageToDict(response.dynamic_metadata) == {
        "principal": edge.user.user_id,
        "tier": "pro",
        "key": edge.key_id,
    }

    # The same request again: the nonce was spent here.
    replay = await edge.check(envoy_check("POST", PLACE_ORDER, sent, ORDER))
    body = assert_denied(replay, 401)
    assert body == {
        "code": 16,
        "message": "authentication failed",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "UNAUTHENTICATED",
                "domain": "tradeguard.dev",
            }
        ],
    }


async def test_signed_request_misuse(edge: Edge) -> None:
    def fresh() -> dict[str, str]:
        return signed_headers(edge.key_id, edge.secret, PLACE_ORDER, ORDER)

    altered = bytearray(ORDER)
    altered[-3] ^= 0x01
    cases = {
        "an altered body byte": envoy_check("POST", PLACE_ORDER, fresh(), bytes(altered)),
        "another path": envoy_check(
            "POST", "/tradeguard.trading.v1.TradingService/CancelOrder", fresh(), ORDER
        ),
        "the body as text, not bytes": envoy_check("POST", PLACE_ORDER, fresh(), ORDER, raw=False),
        "a missing signing header": envoy_check(
            "POST", PLACE_ORDER, {k: v for k, v in fresh().items() if k != "x-tg-nonce"}, ORDER
        ),
        "a stale timestamp": envoy_check(
            "POST",
            PLACE_ORDER,
            dict(
                signing.signed_headers(
                    signing.Scheme.HMAC_SHA256,
                    edge.secret,
                    edge.key_id,
                    int(time.time() * 1000) - 6000,
                    secrets.token_urlsafe(24),
                    PLACE_ORDER,
                    ORDER,
                )
            ),
            ORDER,
        ),
        "a key id with a bad checksum": envoy_check(
            "POST",
            PLACE_ORDER,
            {**fresh(), "x-tg-key": edge.key_id[:-1] + ("A" if edge.key_id[-1] != "A" else "B")},
            ORDER,
        ),
        "a signature and a bearer token": envoy_check(
            "POST", PLACE_ORDER, {**fresh(), "authorization": "Bearer x.y.z"}, ORDER
        ),
        "no credentials": envoy_check("POST", PLACE_ORDER, {}, ORDER),
    }
    for name, request in cases.items():
        response = await edge.check(request)
        assert response.WhichOneof("http_response") == "denied_response", name
        assert_denied(response, 401)

    # Authentic, but outside the key's scopes: 403.
    reader_id, reader_secret = await edge.key(["orders:read"])
    denied = await edge.check(
        envoy_check("POST", PLACE_ORDER, signed_headers(reader_id, reader_secret, PLACE_ORDER, ORDER), ORDER)
    )
    body = assert_denied(denied, 403)
    assert body["code"] == 7 and body["details"][0]["reason"] == "PERMISSION_DENIED"

    # A key bound to an address range, used from elsewhere: 401.
    bound_id, bound_secret = await edge.key(["orders:write"], cidrs=("10.0.0.0/8",))
    outside = await edge.check(
        envoy_check("POST", PLACE_ORDER, signed_headers(bound_id, bound_secret, PLACE_ORDER, ORDER), ORDER)
    )
    assert_denied(outside, 401)
    inside = await edge.check(
        envoy_check(
            "POST",
            PLACE_ORDER,
            signed_headers(bound_id, bound_secret, PLACE_ORDER, ORDER),
            ORDER,
            source_ip="10.1.2.3",
        )
    )
    assert_ok(inside)


async def test_the_signed_path_has_its_query_string(edge: Edge) -> None:
    path = f"{LIST_ORDERS}?account_id=acct-ivy&page_size=10"
    ok = await edge.check(envoy_check("GET", path, signed_headers(edge.key_id, edge.secret, path, b"")))
    assert assert_ok(ok)["x-tg-principal"] == edge.user.user_id
    unsigned_query = await edge.check(
        envoy_check("GET", path, signed_headers(edge.key_id, edge.secret, LIST_ORDERS, b""))
    )
    assert_denied(unsigned_query, 401)


async def test_bearer_orders_scopes_and_revocation(edge: Edge) -> None:
    totp, _ = await enrol(edge.edge, "ivy")
    first = await edge.edge.Login(pb.LoginRequest(username="ivy", password=PASSWORD), timeout=10)
    tokens = (
        await edge.edge.VerifyMfa(
            pb.VerifyMfaRequest(mfa_token=first.mfa_token, totp_code=next_code(totp)), timeout=10
        )
    ).tokens
    bearer = {"authorization": f"Bearer {tokens.access_token}"}
    ok = await edge.check(envoy_check("POST", PLACE_ORDER, {**bearer, "x-tg-tier": "unlimited"}, ORDER))
    upstream = assert_ok(ok)
    assert upstream == {
        "x-tg-principal": edge.user.user_id,
        "x-tg-account": "acct-ivy",
        "x-tg-scopes": "orders:read orders:write",
    }
    assert set(ok.ok_response.headers_to_remove) == {"authorization", "x-tg-tier"}  # no tier: none upstream
    # no key and no tier: absent, so that the edge's rate-limit actions put their default values
    assert json_format.MessageToDict(ok.dynamic_metadata) == {"principal": edge.user.user_id}

    viewer_tokens = (
        await edge.edge.Login(pb.LoginRequest(username="jack", password=PASSWORD), timeout=10)
    ).tokens
    as_viewer = {"authorization": f"Bearer {viewer_tokens.access_token}"}
    assert_denied(await edge.check(envoy_check("POST", PLACE_ORDER, as_viewer, ORDER)), 403)
    assert_ok(await edge.check(envoy_check("GET", f"{LIST_ORDERS}?account_id=acct-jack", as_viewer)))

    # Paths no route names, or not in normal form: refused even to an authenticated caller.
    for path in ("/tradeguard.trading.v1.TradingService/Withdraw", "/admin", f"{LIST_ORDERS}/../PlaceOrder"):
        assert_denied(await edge.check(envoy_check("GET", path, as_viewer)), 403)

    # Revoked: refused by the Checks that follow, within a second (measured).
    await edge.ops.RevokeTokens(pb.RevokeTokensRequest(user_id=edge.user.user_id), timeout=10)
    started = time.monotonic()
    while True:
        response = await edge.check(envoy_check("POST", PLACE_ORDER, bearer, ORDER))
        if response.WhichOneof("http_response") == "denied_response":
            break
        assert time.monotonic() - started < 1.0, "a revoked token still passed after 1 s"
    assert_denied(response, 401)


async def test_bearer_token_misuse(edge: Edge, auth: AuthService) -> None:
    async with auth.channel("ops") as channel:
        ops = stub(channel)
        user = await create_user(ops, "kim", roles=("viewer",))
        bound = (await ops.Login(pb.LoginRequest(username="kim", password=PASSWORD), timeout=10)).tokens
    claims = jwt.decode(bound.access_token, options={"verify_signature": False})
    assert "cnf" in claims and claims["sub"] == user.user_id  # bound to the ops certificate
    header, payload, _ = bound.access_token.split(".")
    none_header = {"alg": "none", "typ": "at+jwt", "kid": "auth/jwt:v1"}
    unsigned = f"{b64url(json.dumps(none_header).encode())}.{payload}."
    cases = {
        "a certificate-bound token without its certificate": bound.access_token,
        "alg none": unsigned,
        "an altered payload": f"{header}.{payload[:-2]}AA.{bound.access_token.rsplit('.', 1)[1]}",
        "not a JWT": "not-a-token",
    }
    for name, token in cases.items():
        response = await edge.check(envoy_check("GET", LIST_ORDERS, {"authorization": f"Bearer {token}"}))
        assert response.WhichOneof("http_response") == "denied_response", name
        assert_denied(response, 401)
    for value in ("Basic dXNlcjpwYXNz", "Bearer ", f"bearer{bound.access_token}"):
        assert_denied(await edge.check(envoy_check("GET", LIST_ORDERS, {"authorization": value})), 401)
    # With the certificate it is bound to (Envoy's include_peer_certificate: URL-encoded PEM), it passes.
    pem = auth.paths.cert("ops").read_text()
    pem = pem[: pem.index("-----END CERTIFICATE-----")] + "-----END CERTIFICATE-----\n"
    with_cert = await edge.check(
        envoy_check(
            "GET", LIST_ORDERS, {"authorization": f"Bearer {bound.access_token}"}, certificate=quote(pem)
        )
    )
    assert assert_ok(with_cert)["x-tg-principal"] == user.user_id


async def test_only_the_edge_may_ask(auth: AuthService) -> None:
    for caller in ("trading", "ops", "trading-client"):
        async with auth.channel(caller) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                    envoy_check("GET", LIST_ORDERS, {}), timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, caller


# --- the pieces, without the service ------------------------------------------------------------------------------


def test_routes_most_specific_wins_and_paths_must_be_normal() -> None:
    routes = Routes(
        {
            "/v1/orders": "orders:write",
            "/v1/*": "orders:read",
            "/v1/public/*": "",
            "/v1/public/secret": "withdraw",
        }
    )
    assert routes.permission("/v1/orders") == "orders:write"
    assert routes.permission("/v1/orders?x=1") == "orders:write"
    assert routes.permission("/v1/orders/1") == "orders:read"
    assert routes.permission("/v1/public/x") == ""
    assert routes.permission("/v1/public/secret") == "withdraw"
    assert routes.permission("/v1") is None and routes.permission("/v2/orders") is None
    for path in (
        "/v1/../admin",
        "/v1/./orders",
        "/v1//orders",
        "/v1/%2e%2e/x",
        "/v1/a%2Fb",
        "v1/orders",
        "/v1/\x00",
    ):
        assert routes.permission(path) is None, path
    default = Routes(DEFAULT_ROUTE_PERMISSIONS)
    assert default.permission(PLACE_ORDER) == "orders:write"
    assert default.permission(f"{LIST_ORDERS}?account_id=a") == "orders:read"
    assert default.permission(PLACE_ORDER + "X") is None  # exact paths are not prefixes


def test_headers_from_the_map_or_the_raw_header_map() -> None:
    http = attrs.AttributeContext.HttpRequest(headers={"X-TG-Key": "a"})
    http.header_map.headers.add(key="x-tg-nonce", raw_value=b"n1")
    http.header_map.headers.add(key="x-tg-nonce", raw_value=b"n2")
    assert request_headers(http) == {"x-tg-key": "a", "x-tg-nonce": "n1,n2"}


async def test_a_key_vault_outage_is_a_503_and_envoy_fails_closed(
    edge: Edge, keyvault: RunningService[KeyVaultSettings, Any], pki_paths: pki.PkiPaths
) -> None:
    """A replica that cannot reach its key vault cannot open an HMAC secret: it answers 503 (with HSTS and a JSON
    body), never OK."""
    cut_off = auth_settings(keyvault, keyvault_target=f"127.0.0.1:{free_port()}")
    async with running_service(SERVICE, cut_off, pki_paths) as replica, replica.channel("edge") as channel:
        check = external_auth_pb2_grpc.AuthorizationStub(channel)
        request = envoy_check(
            "POST", PLACE_ORDER, signed_headers(edge.key_id, edge.secret, PLACE_ORDER, ORDER), ORDER
        )
        response = await check.Check(request, timeout=10)
        body = assert_denied(response, 503)
        assert body["code"] == 14 and response.status.code == 14
