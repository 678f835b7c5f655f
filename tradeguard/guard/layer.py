"""The guard: the kit's authentication and authorisation stage, a request `Layer` of the chain (DESIGN.md, "The guard").

Per method of the guarded services, from the declaration's mapping method → permission (DENY BY DEFAULT: a method
of a guarded service with no entry is refused with PERMISSION_DENIED unless it is listed as public; methods of other
services — health, reflection — are left to the mesh's caller policy). Per call, the credentials in the metadata:

- `authorization: Bearer <jwt>` → verified in process (`JwtVerifier`: cached JWKS, revocations, certificate binding);
- `x-tg-key`, `x-tg-timestamp`, `x-tg-nonce`, `x-tg-signature` → a `SignedRequest` whose body digest is the SHA-256
  of the RAW request bytes as received and whose path is the full method, verified by the auth service through the
  guard's one batcher (`SignedVerifier`). For a client-streaming method the signature covers the FIRST request
  message; the rest of the call's messages ride on that authenticated call;
- from the edge workload only (`spiffe://<trust domain>/svc/edge`, Envoy after `ext_authz`): `x-tg-principal`,
  `x-tg-account`, `x-tg-scopes` (space-separated), `x-tg-tier` name the principal; the edge's own signature checks
  are not repeated. From ANY other caller these headers are refused (never trusted, never silently dropped);
- none, both kinds at once, or a credential header given twice → refused.

Every failure is `Unauthenticated(cause)` (one opaque status; the cause on the RPC's log line); a principal without
the method's permission is `PermissionDenied`. On success the principal is made current for the handler
(`tradeguard.principal.current_principal()`) and its user, account and key go on the RPC's log line (never a token
or signature). The principal is set in the call's own context: grpc.aio runs each RPC in its own task whose context
starts from the server's (where it is never set), so it cannot reach another call; a handler of a public method sees
None.

A client-streaming or bidirectional call is checked on its first message before its handler starts (the kit's
chain refuses a checked stream that ends before its first message), so a guarded handler always has a principal.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Collection, Mapping
from typing import Any, Final

from tradeguard.errors import PermissionDenied, Unauthenticated
from tradeguard.guard.jwt import JwtVerifier, cert_thumbprint
from tradeguard.guard.revocations import RevocationSet
from tradeguard.guard.signed import SignedVerifier
from tradeguard.mesh.identity import peer_spiffe_id
from tradeguard.observability.annotations import annotate
from tradeguard.principal import Principal, set_principal
from tradeguard.rpc.handlers import Context, Layer, RequestCheck
from tradeguard.signing import (
    HEADER_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SignedRequest,
    body_digest,
    key_id_valid,
)

__all__ = ["EDGE_HEADERS", "Guard"]

AUTHORIZATION: Final = "authorization"
EDGE_PRINCIPAL: Final = "x-tg-principal"
EDGE_ACCOUNT: Final = "x-tg-account"
EDGE_SCOPES: Final = "x-tg-scopes"
EDGE_TIER: Final = "x-tg-tier"
EDGE_HEADERS: Final = frozenset({EDGE_PRINCIPAL, EDGE_ACCOUNT, EDGE_SCOPES, EDGE_TIER})
SIGNED_HEADERS: Final = (HEADER_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
_WATCHED: Final = frozenset({AUTHORIZATION, *SIGNED_HEADERS, *EDGE_HEADERS})
_METHOD = re.compile(r"/([A-Za-z_][A-Za-z0-9_.]*)/([A-Za-z_][A-Za-z0-9_]*)")
_PERMISSION = re.compile(r"[a-z][a-z0-9_.-]*(?::[a-z][a-z0-9_.-]*)*")
_MAX_HEADER_CHARS: Final = 8192
_THUMBPRINTS_MAX: Final = 1024

# The call this task is serving, once authenticated: (its context, its principal). Checked so a streamed request's
# later messages do not authenticate again; compared by identity, so it can only ever match its own call.
_CALL: contextvars.ContextVar[tuple[object, Principal] | None] = contextvars.ContextVar(
    "tradeguard_guard_call", default=None
)


def _fail(cause: str) -> Unauthenticated:
    return Unauthenticated(cause)


def peer_ip(context: Context) -> str:
    """The caller's address as grpc reports it ("ipv4:1.2.3.4:5", "ipv6:[::1]:5") without the port."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return ""


class Guard(Layer):
    """Authenticates and authorises every call to the guarded services' methods (see the module)."""

    def __init__(
        self,
        *,
        trust_domain: str,
        services: Collection[str],
        permissions: Mapping[str, str],
        public: Collection[str] = (),
        jwt: JwtVerifier,
        signed: SignedVerifier,
        revocations: RevocationSet,
        edge_workload: str = "edge",
    ) -> None:
        self.services = frozenset(services)
        if not self.services:
            raise ValueError("a guard guards at least one service")
        for method in [*permissions, *public]:
            match = _METHOD.fullmatch(method)
            if match is None or match.group(1) not in self.services:
                raise ValueError(f"{method!r} is not /<guarded service>/<Method>")
        for method, permission in permissions.items():
            if _PERMISSION.fullmatch(permission) is None:
                raise ValueError(f"{method}: permission {permission!r} is not like 'orders:write'")
        overlap = set(permissions) & set(public)
        if overlap:
            raise ValueError(f"methods both public and guarded: {sorted(overlap)}")
        self.permissions = dict(permissions)
        self.public = frozenset(public)
        self.jwt = jwt
        self.signed = signed
        self.revocations = revocations  # what this guard knows was revoked, and its stream's state
        self._edge_id = f"spiffe://{trust_domain}/svc/{edge_workload}"
        self._thumbprints: dict[bytes, str] = {}

    # --- the chain's hooks ----------------------------------------------------------------------------------

    def for_method(self, method: str) -> RequestCheck | None:
        match = _METHOD.fullmatch(method)
        if match is None or match.group(1) not in self.services:
            return None  # not ours: the kit's services (health, reflection) under the mesh policy alone
        if method in self.public:
            return None
        permission = self.permissions.get(method)
        if permission is None:
            return functools.partial(self._undeclared, method)
        return functools.partial(self._check, method, permission)

    async def before(self, context: Context, request: Any, raw: bytes) -> None:  # pragma: no cover
        raise AssertionError("the guard is configured per method (for_method)")

    async def _undeclared(self, method: str, context: Context, request: Any, raw: bytes) -> None:
        raise PermissionDenied("method not open to any principal", reason="METHOD_NOT_DECLARED")

    async def _check(self, method: str, permission: str, context: Context, request: Any, raw: bytes) -> None:
        done = _CALL.get()
        if done is not None and done[0] is context:
            return  # a later message of a streamed request: the call is authenticated
        principal, via = await self._authenticate(context, method, permission, raw)
        annotate(user=principal.user_id, account=principal.account_id, key=principal.key_id, auth=via)
        if not principal.allows(permission):
            raise PermissionDenied(f"this method needs the permission {permission}")
        _CALL.set((context, principal))
        set_principal(principal)

    # --- authentication -------------------------------------------------------------------------------------

    async def _authenticate(
        self, context: Context, method: str, permission: str, raw: bytes
    ) -> tuple[Principal, str]:
        headers: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if key not in _WATCHED:
                continue
            if key in headers:
                raise _fail(f"header {key} given twice")
            if not isinstance(value, str) or len(value) > _MAX_HEADER_CHARS:
                raise _fail(f"header {key} malformed")
            headers[key] = value
        if peer_spiffe_id(context) == self._edge_id:
            return self._edge(headers), "edge"
        if EDGE_HEADERS.intersection(headers):
            raise _fail("edge principal headers from a caller that is not the edge")
        bearer = headers.get(AUTHORIZATION)
        signed = [h for h in SIGNED_HEADERS if h in headers]
        if bearer is not None and signed:
            raise _fail("both a bearer token and a signature")
        if bearer is not None:
            scheme, _, token = bearer.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _fail("authorization is not a bearer token")
            thumbprint = functools.partial(self._thumbprint, context)
            return await self.jwt.verify(token.strip(), thumbprint), "jwt"
        if signed:
            if len(signed) != len(SIGNED_HEADERS):
                raise _fail("signed request lacks a header")
            if not key_id_valid(headers[HEADER_KEY]):
                raise _fail("key id malformed or checksum wrong")
            request = SignedRequest(
                key_id=headers[HEADER_KEY],
                timestamp=headers[HEADER_TIMESTAMP],
                nonce=headers[HEADER_NONCE],
                signature=headers[HEADER_SIGNATURE],
                path=method,
                body_sha256=body_digest(raw),
                source_ip=peer_ip(context),
                required_permission=permission,
            )
            return await self.signed.verify(request), "signed"
        raise _fail("no credentials")

    def _edge(self, headers: Mapping[str, str]) -> Principal:
        user, account = headers.get(EDGE_PRINCIPAL, ""), headers.get(EDGE_ACCOUNT, "")
        if not user or not account:
            raise _fail("edge call without principal headers")
        key = headers.get(HEADER_KEY)
        key_id = key if key is not None and key_id_valid(key) else None
        if key_id is not None and self.revocations.key_revoked(key_id):
            raise _fail("key revoked")
        return Principal(
            user_id=user,
            account_id=account,
            scopes=frozenset(headers.get(EDGE_SCOPES, "").replace(",", " ").split()),
            tier=headers.get(EDGE_TIER, ""),
            key_id=key_id,
        )

    def _thumbprint(self, context: Context) -> str | None:
        """The RFC 8705 thumbprint of this connection's client certificate (cached per certificate)."""
        values = list(context.auth_context().get("x509_pem_cert", ()))
        if len(values) != 1:
            return None
        pem = bytes(values[0])
        known = self._thumbprints.get(pem)
        if known is None:
            try:
                known = cert_thumbprint(pem)
            except ValueError:
                return None
            if len(self._thumbprints) >= _THUMBPRINTS_MAX:
                self._thumbprints.clear()
            self._thumbprints[pem] = known
        return known
