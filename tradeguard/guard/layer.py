"""The guard: the kit's authentication, authorisation, quota and audit stages, a request `Layer` of the chain (DESIGN.md,
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

Then the audit (tradeguard.guard.audit, when the guard has an `AuditStage`): every call of a declared method is
recorded — a refusal (authentication, permission, quota) before it is returned; an accepted call's event appended
beside its handler, the response held by the guard's after-hook (`after_for_method`) until the audit service
acknowledged it, UNAVAILABLE (fail closed; reason OUTCOME_UNKNOWN once the handler ran) if it did not; a handler's
failure as a second event of the same call. A method not declared is recorded as refused for permission; public
methods are not recorded, and neither costs anything after the handler.

A client-streaming or bidirectional call is checked on its first message before its handler starts (the kit's
chain refuses a checked stream that ends before its first message), so a guarded handler always has a principal.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from tradeguard.audit.recorder import risk_decision
from tradeguard.audit.v1 import audit_pb2 as audit_pb
from tradeguard.errors import DomainError, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable
from tradeguard.guard.audit import AuditStage, outcome_of, quota_refusal, status_of
from tradeguard.guard.jwt import JwtVerifier, cert_thumbprint
from tradeguard.guard.quota import EarlyCheck, QuotaStage
from tradeguard.guard.revocations import RevocationSet
from tradeguard.guard.signed import SignedVerifier
from tradeguard.mesh.client import current_request_id
from tradeguard.mesh.identity import peer_spiffe_id
from tradeguard.mesh.peer import peer_ip, source_ip
from tradeguard.observability.annotations import annotate
from tradeguard.observability.redact import Trusted
from tradeguard.principal import Principal, set_principal
from tradeguard.rpc.handlers import After, Context, Layer, RequestCheck
from tradeguard.rpc.metadata import call_metadata
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
_VIA: Final = {via: Trusted(via) for via in ("jwt", "signed", "edge")}
_THUMBPRINTS_MAX: Final = 1024

# The call this task is serving, once authenticated: (its context, its principal). Checked so a streamed request's
# later messages do not authenticate again; compared by identity, so it can only ever match its own call.
_CALL: contextvars.ContextVar[tuple[object, Principal] | None] = contextvars.ContextVar(
    "tradeguard_guard_call", default=None
)


# An accepted call's audit record while its handler runs (the guard's after-hook finishes it), by call context.
_AUDITED: contextvars.ContextVar[_Accepted | None] = contextvars.ContextVar(
    "tradeguard_guard_audited", default=None
)

_REFUSALS: Final = (
    (Unauthenticated, audit_pb.OUTCOME_DENIED_AUTHENTICATION),
    (PermissionDenied, audit_pb.OUTCOME_DENIED_PERMISSION),
    (ResourceExhausted, audit_pb.OUTCOME_DENIED_QUOTA),
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
    write_ahead: bool = False  # the accepted event is acknowledged before the handler runs


@dataclass(slots=True)
class _CallAudit:
    """An audited call as it goes through the guard's stages: what its event says."""

    rule: _Rule
    context: Context
    request: Any
    started: float  # perf_counter when the call reached the guard
    time_us: int
    principal: Principal | None = None  # once verified
    quota: str = ""  # the quota decision
    claimed_key: str = ""  # the key id a signed call names (verified only once `principal` is set)


@dataclass(slots=True)
class _Accepted:
    """An accepted call's audit record: its event (the failure event is keyed to it) and its append."""

    context: object
    event: audit_pb.Event
    started: float  # perf_counter when the call reached the guard
    append: asyncio.Task[bool] | None  # None: acknowledged before the handler ran


def _resource(request: Any) -> str:
    """What the call acts on, when the request names it (an order id, else the client's order id)."""
    for name in ("order_id", "client_order_id"):
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


_ORDER_TEXTS: Final = ("symbol", "quantity", "price")

# Per request message type: whether it is an order (string `symbol`, `quantity` and `price`, enum `side`) whose
# fields go in its audit events' details, and the `side` field's descriptor. Filled once per type (a few entries).
_ORDER_TYPES: dict[Any, Any | None] = {}


def _order_side(descriptor: Any) -> Any | None:
    """The `side` field of an order message type; None for any other type (computed once per type)."""
    try:
        return _ORDER_TYPES[descriptor]
    except KeyError:
        pass
    fields = descriptor.fields_by_name
    side = fields.get("side")
    is_order = (
        side is not None
        and side.enum_type is not None
        and not side.is_repeated
        and all(
            name in fields and fields[name].type == fields[name].TYPE_STRING and not fields[name].is_repeated
            for name in _ORDER_TEXTS
        )
    )
    _ORDER_TYPES[descriptor] = found = side if is_order else None
    return found


def _order_details(request: Any) -> dict[str, str] | None:
    """An order's `symbol`, `side` (its enum value's name), `quantity` and `price` for its audit event's details
    (a market order's empty price left out); None for a request that is not an order. Nothing else of the request."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return None
    side = _order_side(descriptor)
    if side is None:
        return None
    details = {name: value for name in _ORDER_TEXTS if (value := getattr(request, name))}
    number = request.side
    value = side.enum_type.values_by_number.get(number)
    details["side"] = value.name if value is not None else str(number)
    return details


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
        audit: AuditStage | None = None,
        write_ahead: Collection[str] = (),
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
        strays = set(write_ahead) - set(permissions)
        if strays:
            raise ValueError(f"write-ahead methods that are not guarded ones: {sorted(strays)}")
        self.permissions = dict(permissions)
        self.public = frozenset(public)
        self.jwt = jwt
        self.signed = signed
        self.revocations = revocations  # what this guard knows was revoked, and its stream's state
        self.quota = quota  # None: no quota stage (every method unmetered)
        self.unmetered = frozenset(unmetered)
        self.audit = audit  # None: no audit stage (calls not recorded)
        self.write_ahead = frozenset(write_ahead)  # their accepted event acknowledged before the handler runs
        self._trust_domain = trust_domain
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
        rule = _Rule(method, permission, quota, write_ahead=method in self.write_ahead)
        return functools.partial(self._check, rule)

    def after_for_method(self, method: str) -> After | None:
        if self.audit is None or method not in self.permissions:
            return None  # only the guarded (declared) methods' calls are recorded
        return self._after

    async def before(self, context: Context, request: Any, raw: bytes) -> None:  # pragma: no cover
        raise AssertionError("the guard is configured per method (for_method)")

    async def _undeclared(self, method: str, context: Context, request: Any, raw: bytes) -> None:
        error = PermissionDenied("method not open to any principal", reason="METHOD_NOT_DECLARED")
        if self.audit is not None:
            call = _CallAudit(
                _Rule(method, "", None), context, request, time.perf_counter(), self.audit.clock_us()
            )
            await self._refused(self.audit, call, error)
        raise error

    async def _check(self, rule: _Rule, context: Context, request: Any, raw: bytes) -> None:
        done = _CALL.get()
        if done is not None and done[0] is context:
            return  # a later message of a streamed request: the call is authenticated
        audit = self.audit
        if audit is None:
            principal = await self._verify(rule, context, raw)
        else:
            call = _CallAudit(rule, context, request, time.perf_counter(), audit.clock_us())
            try:
                principal = await self._verify(rule, context, raw, call)
            except DomainError as error:
                await self._refused(audit, call, error)
                raise
            await self._accepted(audit, call)
        _CALL.set((context, principal))
        set_principal(principal)

    async def _verify(
        self, rule: _Rule, context: Context, raw: bytes, call: _CallAudit | None = None
    ) -> Principal:
        """The call's principal, authenticated, authorised and within quota (`call`, when audited: the principal
        once verified and the quota decision)."""
        method, permission, quota = rule.method, rule.permission, rule.quota
        credentials = self._credentials(context, method, permission, raw)
        early: EarlyCheck | None = None
        try:
            if isinstance(credentials, SignedRequest):
                if call is not None:
                    call.claimed_key = credentials.key_id
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
            # the verified principal's ids (issued by the auth service or the edge, not a caller's text) and the kit's
            # own word: Trusted, so that the log line renders them as they are (their keys are still checked)
            annotate(
                user=Trusted(principal.user_id),
                account=Trusted(principal.account_id),
                key=None if principal.key_id is None else Trusted(principal.key_id),
                auth=_VIA[via],
            )
            if call is not None:
                call.principal = principal
            if not principal.allows(permission):
                raise PermissionDenied(f"this method needs the permission {permission}")
            # after authorisation (a principal without the permission spends no quota); the edge's calls were
            # counted by Envoy's rate-limit filter
            if quota is not None and via != "edge":
                try:
                    if early is not None:
                        await quota.finish_early(early, principal, method)
                    else:
                        await quota.check(principal, method)
                except ResourceExhausted as error:
                    if call is not None:
                        call.quota = quota_refusal(error)
                    raise
                except Unavailable:
                    if call is not None:
                        call.quota = "unavailable"
                    raise
                if call is not None:
                    call.quota = "allowed"
            elif call is not None and quota is not None:
                call.quota = "edge"
        finally:
            if early is not None and quota is not None and not early.task.done():
                await quota.discard(early)  # auth or authorisation refused: their verdict is the call's
        return principal

    # --- the audit stage (tradeguard.guard.audit) ----------------------------------------------------------------

    def _event(
        self,
        audit: AuditStage,
        call: _CallAudit,
        outcome: audit_pb.Outcome.ValueType,
        status: str,
        cause: str = "",
    ) -> audit_pb.Event:
        principal, request = call.principal, call.request
        if principal is not None:
            user, account, key = principal.user_id, principal.account_id, principal.key_id or ""
        else:
            named = getattr(request, "account_id", "")
            user, account, key = "", named if isinstance(named, str) else "", call.claimed_key
        return audit.event(
            time_us=call.time_us,
            method=call.rule.method,
            outcome=outcome,
            status=status,
            latency_us=int((time.perf_counter() - call.started) * 1_000_000),
            principal=user,
            account_id=account,
            api_key_id=key,
            caller=peer_spiffe_id(call.context) or "",
            source_ip=source_ip(call.context, self._trust_domain),
            resource=_resource(request),
            action=call.rule.permission,
            quota=call.quota,
            request_id=current_request_id() or "",
            cause=cause,
            details=_order_details(request),
        )

    async def _refused(self, audit: AuditStage, call: _CallAudit, error: DomainError) -> None:
        """Record a refusal before it is returned (its append failing leaves the refusal as it is)."""
        outcome = audit_pb.OUTCOME_FAILED  # e.g. the rate-limit service unavailable
        for kind, denied in _REFUSALS:
            if isinstance(error, kind):
                outcome = denied
                break
        cause = error.cause if isinstance(error, Unauthenticated) else ""
        await audit.record(self._event(audit, call, outcome, error.code.name, cause))

    async def _accepted(self, audit: AuditStage, call: _CallAudit) -> None:
        """Send the accepted call's event: first for a write-ahead method or while the stage is degraded (the
        handler runs only once it is acknowledged), else beside the handler."""
        event = self._event(audit, call, audit_pb.OUTCOME_OK, "OK")
        if call.rule.write_ahead or audit.degraded:
            if not await audit.record(event):
                raise audit.refused_before_handler()
            _AUDITED.set(_Accepted(call.context, event, call.started, None))
        else:
            _AUDITED.set(_Accepted(call.context, event, call.started, audit.start(event)))

    async def _after(self, context: Context, error: BaseException | None, done: bool) -> None:
        """After the handler (see tradeguard.guard.audit): hold the response until the accepted event is
        acknowledged (UNAVAILABLE if it was not), and record a handler's failure."""
        accepted = _AUDITED.get()
        if accepted is None or accepted.context is not context:
            return  # refused before it was accepted: recorded by the check
        audit = self.audit
        assert audit is not None
        if accepted.append is not None:
            acknowledged = await accepted.append
            accepted.append = None
            if not acknowledged:
                _AUDITED.set(None)
                raise audit.unknown(error)
        if not done:
            return
        _AUDITED.set(None)
        if error is None:
            return
        status = status_of(error, context)
        first = accepted.event
        failure = audit.event(
            event_id=f"{first.event_id}.f",
            time_us=audit.clock_us(),
            method=first.method,
            outcome=outcome_of(error, status),
            status=status,
            latency_us=int((time.perf_counter() - accepted.started) * 1_000_000),
            principal=first.principal,
            account_id=first.account_id,
            api_key_id=first.api_key_id,
            caller=first.caller,
            source_ip=first.source_ip,
            resource=first.resource,
            action=first.action,
            quota=first.quota_decision,
            risk=risk_decision(error),
            request_id=first.request_id,
        )
        await audit.record(failure)

    # --- authentication -------------------------------------------------------------------------------------

    def _credentials(
        self, context: Context, method: str, permission: str, raw: bytes
    ) -> Principal | _Bearer | SignedRequest:
        """The call's credentials, checked for shape: the edge's principal (final), a bearer token or a signed
        request (still to verify)."""
        headers: dict[str, str] = {}
        for key, value in call_metadata(context):
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
                source_ip=peer_ip(context.peer() or ""),
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
        values = context.auth_context().get("x509_pem_cert")
        if type(values) is not list or len(values) != 1:  # grpc's auth context: a list of bytes per property
            return None
        pem = bytes(values[0])  # the same object when it is bytes already
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
