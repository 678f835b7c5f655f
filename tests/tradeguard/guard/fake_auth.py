"""A small in-test auth source for the guard's tests: real crypto, real gRPC, only the three RPCs a guard calls.

`TokenIssuer` signs access tokens (EdDSA, typ at+jwt) with Ed25519 keys it publishes as a JWKS. `SmallAuth` serves
GetJwks, WatchRevocations (initial metadata at once, then the backlog from `since_sequence`, then each new
revocation as it is published) and VerifySignedRequests (HMAC and Ed25519 through tradeguard.signing, a 5 s window,
nonces remembered, scopes checked) on a MeshServer as the `auth` workload. It stands in for services/auth until that
can run; the end-to-end tests use the real one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import timestamp_pb2

from tradeguard import signing
from tradeguard.auth.v1 import auth_pb2, auth_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.mesh.authz import MethodPolicy
from tradeguard.mesh.server import MeshServer, ServerConfig, Service

ISSUER = "tradeguard-auth"
AUDIENCE = "tradeguard"
AUTH = "tradeguard.auth.v1.AuthService"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuer:
    """Ed25519 signing keys by kid, their JWKS, and tokens signed with them."""

    def __init__(self) -> None:
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.add_key("auth/jwt:v1")

    def add_key(self, kid: str) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        self.keys[kid] = key
        return key

    def jwks(self) -> str:
        entries = []
        for kid, key in self.keys.items():
            entry = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
            entry.update(kid=kid, use="sig", alg="EdDSA")
            entries.append(entry)
        return json.dumps({"keys": entries})

    def claims(self, now: float | None = None, **overrides: Any) -> dict[str, Any]:
        now = time.time() if now is None else now
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "usr_1",
            "acct": "acct-1",
            "scope": "orders:read orders:write",
            "amr": ["pwd", "otp"],
            "fam": "fam_1",
            "jti": uuid.uuid4().hex,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + 300,
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(
        self,
        now: float | None = None,
        *,
        kid: str = "auth/jwt:v1",
        headers: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> str:
        header: dict[str, Any] = {"typ": "at+jwt", "kid": kid}
        header.update(headers or {})
        return jwt.encode(self.claims(now, **overrides), self.keys[kid], algorithm="EdDSA", headers=header)


@dataclass
class ApiKey:
    key_id: str
    principal: auth_pb2.Principal
    secret: str | None = None
    public_key: bytes | None = None


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(round(seconds * 1_000_000))
    return stamp


@dataclass
class SmallAuth(auth_pb2_grpc.AuthServiceServicer):
    issuer: TokenIssuer = field(default_factory=TokenIssuer)
    keys: dict[str, ApiKey] = field(default_factory=dict)
    revocations: list[auth_pb2.WatchRevocationsResponse] = field(default_factory=list)
    verify_latency_s: float = 0.0  # how long a VerifySignedRequests takes (a backend's latency)
    jwks_calls: int = 0
    verify_calls: int = 0
    verified: list[auth_pb2.SignedRequest] = field(default_factory=list)
    watch_since: list[int] = field(default_factory=list)
    nonces: set[tuple[str, str]] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    # --- what a test sets up ------------------------------------------------------------------------------

    def add_hmac_key(
        self, scopes: str = "orders:read orders:write", account: str = "acct-1"
    ) -> tuple[str, str]:
        key_id, secret = signing.new_key_id(_random), signing.new_hmac_secret(_random)
        principal = auth_pb2.Principal(
            user_id="usr_1", account_id=account, key_id=key_id, scopes=scopes.split(), tier="pro"
        )
        self.keys[key_id] = ApiKey(key_id, principal, secret=secret)
        return key_id, secret

    def add_ed25519_key(self, scopes: str = "orders:read orders:write") -> tuple[str, bytes]:
        key_id, seed = signing.new_key_id(_random), _random(32)
        principal = auth_pb2.Principal(
            user_id="usr_2", account_id="acct-2", key_id=key_id, scopes=scopes.split(), tier="basic"
        )
        self.keys[key_id] = ApiKey(key_id, principal, public_key=signing.ed25519_public_key(seed))
        return key_id, seed

    def revoke(self, expire_in_s: float = 600.0, revoke_time: float | None = None, **target: str) -> int:
        """Publish a revocation (jti=, family_id=, user_id= or key_id=); its sequence."""
        sequence = len(self.revocations) + 1
        message = auth_pb2.WatchRevocationsResponse(
            sequence=sequence,
            expire_time=_stamp(time.time() + expire_in_s),
            revoke_time=_stamp(time.time() if revoke_time is None else revoke_time),
            **target,
        )
        self.revocations.append(message)
        self._changed.set()
        return sequence

    # --- the RPCs -----------------------------------------------------------------------------------------

    async def GetJwks(self, request: auth_pb2.GetJwksRequest, context: Any) -> auth_pb2.GetJwksResponse:
        self.jwks_calls += 1
        return auth_pb2.GetJwksResponse(jwks_json=self.issuer.jwks())

    async def WatchRevocations(
        self, request: auth_pb2.WatchRevocationsRequest, context: Any
    ) -> AsyncIterator[auth_pb2.WatchRevocationsResponse]:
        self.watch_since.append(request.since_sequence)
        await context.send_initial_metadata(())
        sent = max(request.since_sequence, 1) - 1
        while True:
            while sent < len(self.revocations):
                yield self.revocations[sent]
                sent += 1
            self._changed.clear()
            await self._changed.wait()

    async def VerifySignedRequests(
        self, request: auth_pb2.VerifySignedRequestsRequest, context: Any
    ) -> auth_pb2.VerifySignedRequestsResponse:
        self.verify_calls += 1
        if self.verify_latency_s:
            await asyncio.sleep(self.verify_latency_s)
        results = [self._verify(item) for item in request.requests]
        return auth_pb2.VerifySignedRequestsResponse(results=results)

    def _verify(self, item: auth_pb2.SignedRequest) -> auth_pb2.SignedRequestResult:
        self.verified.append(item)
        refused = auth_pb2.SignedRequestResult()
        key = self.keys.get(item.key_id)
        if key is None:
            return refused
        try:
            timestamp = signing.parse_timestamp(item.timestamp)
            signing.parse_nonce(item.nonce)
        except signing.MalformedRequest:
            return refused
        now_ms = time.time_ns() // 1_000_000
        if signing.check_window(timestamp, now_ms, 5000, 1000) is not signing.Window.OK:
            return refused
        args = (item.signature, item.key_id, item.timestamp, item.nonce, item.path, item.body_sha256)
        if key.secret is not None:
            good = signing.verify_hmac(key.secret, *args)
        else:
            assert key.public_key is not None
            good = signing.verify_ed25519(key.public_key, *args)
        if not good or (item.key_id, item.nonce) in self.nonces:
            return refused
        self.nonces.add((item.key_id, item.nonce))
        if item.required_permission and item.required_permission not in key.principal.scopes:
            return auth_pb2.SignedRequestResult(permission_denied=True)
        return auth_pb2.SignedRequestResult(principal=key.principal)


def _random(n: int) -> bytes:
    return os.urandom(n)


@dataclass
class RunningAuth:
    server: MeshServer
    servicer: SmallAuth

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@contextlib.asynccontextmanager
async def small_auth(
    paths: pki.PkiPaths,
    servicer: SmallAuth | None = None,
    *,
    port: int = 0,
    callers: frozenset[str] = frozenset({"echo", "trading"}),
) -> AsyncIterator[RunningAuth]:
    """SmallAuth served as the `auth` workload on `port` (0: a free one); the guards' workloads may call it."""
    # the generated servicer declares every RPC abstract; the guard calls only three
    auth = servicer if servicer is not None else SmallAuth()  # type: ignore[abstract]
    config = ServerConfig(name="auth", port=port, home=paths.home, grace_s=0.0, drain_s=0.0)
    server = MeshServer(
        config,
        MethodPolicy(pki.trust_domain(paths), {f"/{AUTH}/*": callers}),
        [Service(AUTH, lambda s: auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, s))],
    )
    await server.start()
    try:
        yield RunningAuth(server, auth)
    finally:
        auth._changed.set()
        await server.stop(grace=0, drain=0)


def hs256_with_public_key(issuer: TokenIssuer, kid: str = "auth/jwt:v1") -> str:
    """The classic confusion attack: HS256 "signed" with the published public key as the HMAC secret."""
    import hashlib
    import hmac

    public = jwt.algorithms.OKPAlgorithm.to_jwk(issuer.keys[kid].public_key())
    header = b64url(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
    payload = b64url(json.dumps(issuer.claims()).encode())
    signed = f"{header}.{payload}".encode()
    signature = hmac.new(public.encode(), signed, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def unsigned(issuer: TokenIssuer, kid: str = "auth/jwt:v1") -> str:
    """alg: none, no signature."""
    header = b64url(json.dumps({"alg": "none", "typ": "at+jwt", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(issuer.claims()).encode())}."


def with_payload(token: str, **changes: Any) -> str:
    """The token with claims changed in its payload and its original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


def with_header(token: str, **changes: Any) -> str:
    """The token with header fields changed (None: removed) and its original signature kept."""
    header, payload, signature = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    for name, value in changes.items():
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return f"{b64url(json.dumps(fields).encode())}.{payload}.{signature}"
