"""The guard: the kit's authentication, authorisation and quota stages, a request `Layer` of the chain (DESIGN.md,
"The guard").

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
the method's permission is `PermissionDenied`.

Then the quota (tradeguard.guard.quota, when the guard has a `QuotaStage`): the verified principal's call is counted
by the rate-limit service — AFTER authorisation, so a principal refused for permission spends no quota — except
where Envoy's rate-limit filter already counted it (the edge's calls) and for the methods listed `unmetered`.
Over the limit → `ResourceExhausted`; the rate-limit service unreachable or failing → `Unavailable` (fail closed).
For a signed call whose key this guard has verified before from the same caller workload, the check starts beside
the auth RPC (one round trip, not two); its verdict is used only if authentication and authorisation pass, and a
refusal by either is what the caller sees. On success the principal is made current for the handler
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
from dataclasses import dataclass
from typing import Any, Final

from tradeguard.errors import PermissionDenied, Unauthenticated
from tradeguard.guard.jwt import JwtVerifier, cert_thumbprint
from tradeguard.guard.quota import EarlyCheck, QuotaStage
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


@dataclass(frozen=True, slots=True)
class _Bearer:
    token: str  # never logged


@dataclass(frozen=True, slots=True)
class _Rule:
    """A guarded method: the permission it needs, and the quota stage that counts it (None: not counted)."""

    method: str
    permission: str
    quota: QuotaStage | None


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
    """Authenticates, authorises and counts every call to the guarded services' methods (see the module)."""

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
        quota: QuotaStage | None = None,
        unmetered: Collection[str] = (),
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
        strays = set(unmetered) - set(permissions)
        if strays:
            raise ValueError(f"unmetered methods that are not guarded ones: {sorted(strays)}")
        self.permissions = dict(permissions)
        self.public = frozenset(public)
        self.jwt = jwt
        self.signed = signed
        self.revocations = revocations  # what this guard knows was revoked, and its stream's state
        self.quota = quota  # None: no quota stage (every method unmetered)
        self.unmetered = frozenset(unmetered)
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
        quota = None if method in self.unmetered else self.quota
        return functools.partial(self._check, _Rule(method, permission, quota))

    async def before(self, context: Context, request: Any, raw: bytes) -> None:  # pragma: no cover
        raise AssertionError("the guard is configured per method (for_method)")

    async def _undeclared(self, method: str, context: Context, request: Any, raw: bytes) -> None:
        raise PermissionDenied("method not open to any principal", reason="METHOD_NOT_DECLARED")

    async def _check(self, rule: _Rule, context: Context, request: Any, raw: bytes) -> None:
        method, permission, quota = rule.method, rule.permission, rule.quota
        done = _CALL.get()
        if done is not None and done[0] is context:
            return  # a later message of a streamed request: the call is authenticated
        credentials = self._credentials(context, method, permission, raw)
        early: EarlyCheck | None = None
        try:
            if isinstance(credentials, SignedRequest):
                caller = peer_spiffe_id(context) or ""
                if quota is not None:  # beside the auth RPC when the key's tier is known from this caller
                    early = quota.start_early(credentials.key_id, caller, method, permission)
                principal, via = await self.signed.verify(credentials), "signed"
                if quota is not None:
                    quota.remember(principal, caller)
            elif isinstance(credentials, _Bearer):
                thumbprint = functools.partial(self._thumbprint, context)
                principal, via = await self.jwt.verify(credentials.token, thumbprint), "jwt"
            else:
                principal, via = credentials, "edge"
            annotate(user=principal.user_id, account=principal.account_id, key=principal.key_id, auth=via)
            if not principal.allows(permission):
                raise PermissionDenied(f"this method needs the permission {permission}")
            # after authorisation (a principal without the permission spends no quota); the edge's calls were
            # counted by Envoy's rate-limit filter
            if quota is not None and via != "edge":
                if early is not None:
                    await quota.finish_early(early, principal, method)
                else:
                    await quota.check(principal, method)
        finally:
            if early is not None and quota is not None and not early.task.done():
                await quota.discard(early)  # auth or authorisation refused: their verdict is the call's
        _CALL.set((context, principal))
        set_principal(principal)

    # --- authentication -------------------------------------------------------------------------------------

    def _credentials(
        self, context: Context, method: str, permission: str, raw: bytes
    ) -> Principal | _Bearer | SignedRequest:
        """The call's credentials, checked for shape: the edge's principal (final), a bearer token or a signed
        request (still to verify)."""
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
            return self._edge(headers)
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
            return _Bearer(token.strip())
        if signed:
            if len(signed) != len(SIGNED_HEADERS):
                raise _fail("signed request lacks a header")
            if not key_id_valid(headers[HEADER_KEY]):
                raise _fail("key id malformed or checksum wrong")
            return SignedRequest(
                key_id=headers[HEADER_KEY],
                timestamp=headers[HEADER_TIMESTAMP],
                nonce=headers[HEADER_NONCE],
                signature=headers[HEADER_SIGNATURE],
                path=method,
                body_sha256=body_digest(raw),
                source_ip=peer_ip(context),
                required_permission=permission,
            )
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
