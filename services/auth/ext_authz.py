"""Envoy's external authorisation (`envoy.service.auth.v3.Authorization/Check`), served by the auth service for
the HTTP edge (deploy/envoy/edge.yaml; only the `edge` workload may call it, services/auth/policy.py).

Each HTTP request Envoy holds is authenticated here, one of two ways:
- `authorization: Bearer <JWT>`: verified as the guards verify it (algorithms from configuration, typ, iss, aud,
  exp, nbf, kid only from the JWKS, revocations); a certificate-bound token (`cnf.x5t#S256`) passes only with
  the certificate it is bound to (Envoy's `include_peer_certificate`; without it such a token is refused).
- a signed API-key request (`x-tg-key`, `x-tg-timestamp`, `x-tg-nonce`, `x-tg-signature`, tradeguard.signing):
  the path signed is the HTTP path with its query string as Envoy saw it, the body digest the SHA-256 of exactly
  the bytes Envoy buffered (`with_request_body.pack_as_bytes` → `attributes.request.http.raw_body`; a body sent
  as text or cut short is refused), the source IP the connection's (`attributes.source.address`); the nonce is
  spent here, so the guard behind the edge never re-checks it.
Both at once, or neither, is a 401. Then the route's permission (settings ROUTE_PERMISSIONS: exact path or
`prefix/*`, the most specific wins; a path no route matches, or one with `.`/`..`/empty segments or encoded
slashes, is refused): missing → 403.

Answers:
- OK: upstream request headers `x-tg-principal` (user id), `x-tg-account`, `x-tg-scopes` (space-separated,
  sorted), `x-tg-key` (signed calls), `x-tg-tier` (when the principal has one), each overwriting whatever the
  client sent; every other `x-tg-*` header the client sent and its credentials (`authorization`, the signing
  headers) removed; `dynamic_metadata` for the rate limiter's descriptor (deploy/envoy/edge.yaml): `principal`
  always, `key` only for a signed call, `tier` only when the principal has one (absent, the route's actions
  put their default value instead).
- Denied: 401 with `WWW-Authenticate: TG1-HMAC-SHA256, Bearer`, or 403, or 503 when the auth service cannot
  decide (its key vault or hot store unreachable: Envoy fails closed); the body is JSON in the shape of a
  transcoded gRPC error (`{"code": 16, "message": "authentication failed", "details": [ErrorInfo]}`), so HTTP
  clients see one error format. The cause is written to the Check's log line, never to the answer.
- EVERY answer, OK or denied, carries Strict-Transport-Security (settings HSTS).

Every refusal is recorded in the audit service (with the service's recorder, tradeguard.audit.recording) before
it is returned: method the HTTP path, action `edge.authorize`, outcome DENIED_AUTHENTICATION (401),
DENIED_PERMISSION (403) or FAILED (503), the client's address, the key id the request names (a claim), the
request id Envoy assigned, the cause (never a credential). An allowed request is recorded by the guard of the
service it reaches, so each edge call is recorded once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from services.auth.peer import address_of, url_encoded_x5t_s256
from tradeguard.audit.recorder import Recorder
from tradeguard.audit.v1 import audit_pb2 as audit_pb
from tradeguard.errors import DomainError, PermissionDenied, Unauthenticated
from tradeguard.guard.layer import EDGE_ACCOUNT, EDGE_PRINCIPAL, EDGE_SCOPES, EDGE_TIER
from tradeguard.mesh.identity import peer_spiffe_id
from tradeguard.observability.annotations import annotate, current_annotations
from tradeguard.observability.logging import get_logger
from tradeguard.principal import Principal
from tradeguard.rpc.errors import DOMAIN
from tradeguard.signing import (
    HEADER_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    SignedRequest,
    body_digest,
)

__all__ = [
    "HEADER_ACCOUNT",
    "HEADER_PRINCIPAL",
    "HEADER_SCOPES",
    "HEADER_TIER",
    "WWW_AUTHENTICATE",
    "EdgeAuthenticator",
    "ExtAuthzServicer",
    "Routes",
    "SignedVerdict",
]

_log = get_logger("auth.ext_authz")

# The headers the edge hands upstream are the ones every guard reads from the edge (one definition, the kit's).
HEADER_PRINCIPAL: Final = EDGE_PRINCIPAL
HEADER_ACCOUNT: Final = EDGE_ACCOUNT
HEADER_SCOPES: Final = EDGE_SCOPES
HEADER_TIER: Final = EDGE_TIER
WWW_AUTHENTICATE: Final = "TG1-HMAC-SHA256, Bearer"
_SIGNING_HEADERS: Final = (HEADER_KEY, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE)
_PARTIAL_BODY: Final = "x-envoy-auth-partial-body"
_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MAX_BEARER: Final = 8192  # characters: a JWT of ours is well under 1 KiB


@dataclass(frozen=True, slots=True)
class SignedVerdict:
    """One signed request's verdict: `principal` when authentic and allowed; `permission_denied` when authentic
    but the key's scopes lack the permission; neither: authentication failed (the cause is logged by the
    verifier)."""

    principal: Principal | None
    permission_denied: bool = False


class EdgeAuthenticator(Protocol):
    """What Check needs of the auth service's cores (services/auth/service.py wires them)."""

    async def bearer(self, token: str, cert_thumbprint: str | None) -> Principal:
        """The principal of a valid, unrevoked access token; `Unauthenticated(cause=…)` otherwise."""
        ...

    async def signed(self, request: SignedRequest) -> SignedVerdict: ...


class Routes:
    """The permission each HTTP route needs: exact paths, and prefixes written `<prefix>/*`; the most specific
    match wins. `permission(path)` is None when no route matches (or the path is not in normal form)."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self._exact: dict[str, str] = {}
        self._prefixes: list[tuple[str, str]] = []
        for route, permission in table.items():
            if route.endswith("/*"):
                self._prefixes.append((route[:-1], permission))  # keeps the trailing "/"
            else:
                self._exact[route] = permission
        self._prefixes.sort(key=lambda item: len(item[0]), reverse=True)

    def permission(self, path: str) -> str | None:
        route = path.split("?", 1)[0]
        if not _normal(route):
            return None
        exact = self._exact.get(route)
        if exact is not None:
            return exact
        for prefix, permission in self._prefixes:
            if route.startswith(prefix):
                return permission
        return None


def _normal(path: str) -> bool:
    """An absolute path without empty, `.` or `..` segments, encoded slashes or backslashes, or control
    characters: what Envoy's normalize_path/merge_slashes/REJECT_REQUEST leave, and nothing a router could read
    differently from this table."""
    if not path.startswith("/") or "\\" in path or "#" in path or not path.isprintable():
        return False
    lowered = path.lower()
    if "%2f" in lowered or "%5c" in lowered or "%2e" in lowered:
        return False
    segments = path[1:].split("/")
    return all(segment not in ("", ".", "..") for segment in segments[:-1]) and segments[-1] not in (
        ".",
        "..",
    )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def request_headers(http: Any) -> dict[str, str]:
    """The request's headers by lowercase name, from `headers` or (with Envoy's encode_raw_headers) `header_map`;
    repeated headers joined with "," as Envoy joins them."""
    out: dict[str, str] = {}
    for key, value in http.headers.items():
        out[key.lower()] = value
    for entry in http.header_map.headers:
        value = entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
        key = entry.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


class _Denied(Exception):
    def __init__(self, status: int, cause: str) -> None:
        super().__init__(cause)
        self.status = status
        self.cause = cause


#: a refused edge request's audit event: its action, and by HTTP status its outcome and status code name
EDGE_ACTION: Final = "edge.authorize"
_REFUSALS: Final[Mapping[int, tuple[audit_pb.Outcome.ValueType, str]]] = {
    401: (audit_pb.OUTCOME_DENIED_AUTHENTICATION, "UNAUTHENTICATED"),
    403: (audit_pb.OUTCOME_DENIED_PERMISSION, "PERMISSION_DENIED"),
    503: (audit_pb.OUTCOME_FAILED, "UNAVAILABLE"),
}

_ANSWERS: Final[Mapping[int, tuple[int, str, str]]] = {
    401: (code_pb2.UNAUTHENTICATED, "authentication failed", "UNAUTHENTICATED"),
    403: (code_pb2.PERMISSION_DENIED, "permission denied", "PERMISSION_DENIED"),
    503: (code_pb2.UNAVAILABLE, "authorization unavailable", "UNAVAILABLE"),
}


class ExtAuthzServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """`Check` over the auth service's cores (see the module docstring)."""

    def __init__(
        self,
        authenticator: EdgeAuthenticator,
        routes: Routes,
        hsts: str,
        recorder: Recorder | None = None,
    ) -> None:
        self._auth = authenticator
        self._routes = routes
        self._hsts = hsts
        self._recorder = recorder

    async def Check(self, request: ext.CheckRequest, context: Any) -> ext.CheckResponse:
        started, time_us = time.perf_counter(), self._recorder.clock_us() if self._recorder else 0
        try:
            return await self._check(request)
        except _Denied as denied:
            status, cause = denied.status, denied.cause
        except Unauthenticated as error:
            status, cause = 401, error.cause
        except PermissionDenied as error:
            status, cause = 403, error.message
        except DomainError as error:
            status, cause = 503, f"{error.code}: {error.reason}"
        except Exception as error:  # the edge fails closed; the answer still has its HSTS and JSON body
            _log.error("ext_authz_failed", error=type(error).__name__, exc_info=error)
            status, cause = 503, type(error).__name__
        annotate(authz="unavailable" if status == 503 else "denied", http_status=status, cause=cause)
        if self._recorder is not None:
            await self._record_refusal(
                self._recorder, request, context, status=status, cause=cause, started=(started, time_us)
            )
        return self._denied(status)

    @staticmethod
    async def _record_refusal(
        recorder: Recorder,
        request: ext.CheckRequest,
        context: Any,
        *,
        status: int,
        cause: str,
        started: tuple[float, int],
    ) -> None:
        """Record a refused edge request before the refusal is returned (its append failing leaves the refusal as
        it is). An allowed one is recorded by the guard of the service it reaches."""
        http = request.attributes.request.http
        headers = request_headers(http)
        notes = current_annotations() or {}
        outcome, code = _REFUSALS[status]
        event = recorder.event(
            time_us=started[1],
            method=http.path,
            outcome=outcome,
            status=code,
            latency_us=int((time.perf_counter() - started[0]) * 1_000_000),
            principal=str(notes.get("user_id") or ""),
            api_key_id=headers.get(HEADER_KEY, ""),  # the key the request names (verified only for a 403)
            caller=peer_spiffe_id(context) or "",
            source_ip=address_of(request.attributes.source.address.socket_address.address),
            action=EDGE_ACTION,
            request_id=headers.get("x-request-id", ""),
            cause=cause,
        )
        await recorder.record(event)

    async def _check(self, request: ext.CheckRequest) -> ext.CheckResponse:
        attributes = request.attributes
        http = attributes.request.http
        headers = request_headers(http)
        path = http.path
        authorization = headers.get("authorization")
        signing = [name for name in _SIGNING_HEADERS if name in headers]
        if authorization is not None and signing:
            raise _Denied(401, "both a bearer token and a signature")
        if signing:
            permission = self._routes.permission(path)
            principal = await self._signed(attributes, http, headers, path, permission or "")
            kind = "signed"
        elif authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip() or len(token) > _MAX_BEARER:
                raise _Denied(401, "authorization is not a bearer token")
            thumbprint = url_encoded_x5t_s256(attributes.source.certificate)
            principal = await self._auth.bearer(token.strip(), thumbprint)
            permission = self._routes.permission(path)
            kind = "bearer"
        else:
            raise _Denied(401, "no credentials")
        annotate(
            auth_kind=kind, user_id=principal.user_id, key_id=principal.key_id, token_id=principal.token_id
        )
        if permission is None:
            raise _Denied(403, "no route for the path")
        if permission and not principal.allows(permission):
            raise _Denied(403, f"missing permission {permission}")
        return self._ok(principal, headers)

    async def _signed(
        self, attributes: Any, http: Any, headers: Mapping[str, str], path: str, permission: str
    ) -> Principal:
        missing = [name for name in _SIGNING_HEADERS if not headers.get(name)]
        if missing:
            raise _Denied(401, f"missing {', '.join(missing)}")
        if headers.get(_PARTIAL_BODY, "").lower() == "true":
            raise _Denied(401, "body cut short by Envoy (allow_partial_message)")
        raw = bytes(http.raw_body)
        if http.body and not raw:
            raise _Denied(401, "body sent as text: configure with_request_body.pack_as_bytes")
        if http.size > 0 and http.size != len(raw):
            raise _Denied(401, "body incomplete")
        source = address_of(attributes.source.address.socket_address.address)
        verdict = await self._auth.signed(
            SignedRequest(
                key_id=headers[HEADER_KEY],
                timestamp=headers[HEADER_TIMESTAMP],
                nonce=headers[HEADER_NONCE],
                signature=headers[HEADER_SIGNATURE],
                path=path,
                body_sha256=body_digest(raw),
                source_ip=source,
                required_permission=permission,
            )
        )
        if verdict.permission_denied:
            raise _Denied(403, f"the key's scopes lack {permission}")
        if verdict.principal is None:
            raise _Denied(401, "signed request refused")  # its cause is on the verifier's log
        return verdict.principal

    def _ok(self, principal: Principal, sent: Iterable[str]) -> ext.CheckResponse:
        upstream = {
            HEADER_PRINCIPAL: principal.user_id,
            HEADER_ACCOUNT: principal.account_id,
            HEADER_SCOPES: " ".join(sorted(principal.scopes)),
        }
        if principal.key_id:
            upstream[HEADER_KEY] = principal.key_id
        if principal.tier:
            upstream[HEADER_TIER] = principal.tier
        # Envoy removes after it sets: only what we do not set is removed (what we set overwrites the client's).
        remove = sorted(
            name
            for name in sent
            if name not in upstream and (name.startswith("x-tg-") or name == "authorization")
        )
        # Only what the principal has: an absent entry is where the route's rate-limit actions put their
        # default_value (deploy/envoy/edge.yaml), so the rate limiter sees "-" (no key, the default tier).
        facts = {"principal": principal.user_id}
        if principal.key_id:
            facts["key"] = principal.key_id
        if principal.tier:
            facts["tier"] = principal.tier
        metadata = struct_pb2.Struct()
        metadata.update(facts)
        annotate(authz="ok")
        return ext.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ext.OkHttpResponse(
                headers=[_header(key, value) for key, value in upstream.items()],
                headers_to_remove=remove,
                response_headers_to_add=[_header("strict-transport-security", self._hsts)],
            ),
            dynamic_metadata=metadata,
        )

    def _denied(self, http_status: int) -> ext.CheckResponse:
        code, message, reason = _ANSWERS[http_status]
        body = json.dumps(
            {
                "code": code,
                "message": message,
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": DOMAIN}
                ],
            },
            separators=(",", ":"),
        )
        headers = [
            _header("strict-transport-security", self._hsts),
            _header("content-type", "application/json"),
            _header("cache-control", "no-store"),
        ]
        if http_status == 401:
            headers.append(_header("www-authenticate", WWW_AUTHENTICATE))
        return ext.CheckResponse(
            status=status_pb2.Status(code=code, message=message),
            denied_response=ext.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status),
                headers=headers,
                body=body,
            ),
        )


def register(servicer: ExtAuthzServicer) -> Callable[[Any], None]:
    """The `add_…_to_server` call of the Authorization service, for `tradeguard.mesh.server.Service`."""

    def add(server: Any) -> None:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)

    return add


FULL_NAME: Final = "envoy.service.auth.v3.Authorization"
