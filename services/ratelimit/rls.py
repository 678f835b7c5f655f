"""Envoy's rate-limit service (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`), served by the
rate-limit service for the HTTP edge (deploy/envoy/edge.yaml; only the `edge` workload may call it,
services/ratelimit/policy.py), over the same limits and counters as RateLimitService.

The request:
- `domain` must be `tradeguard` (anything else is INVALID_ARGUMENT naming `domain`: an edge configured for other
  limits must not be counted against ours).
- each descriptor's entries: `principal` (the user id ext_authz verified), `key` (the API key id of a signed call;
  absent, empty or "-" for a bearer token), `tier` (absent, empty or "-": the limits file's default tier), `method`
  (the request's `:path`; a query string is dropped). Subject `key:<key>` when there is a key, else
  `user:<principal>`; operation = the method. A descriptor without `principal` or `method`, with another entry, a
  repeated one, or a `limit` override is INVALID_ARGUMENT naming it (`descriptors[i].entries`, …): Envoy then
  answers 503 (the edge fails closed), never an unlimited request.
- the cost: the descriptor's `hits_addend` when set, else the request's; 0 means 1.
All descriptors of one request are queued together on the service's one batcher (the one CheckQuota uses), so
they reach the store in one round trip (with other requests' under load). Each descriptor is its own atomic
check: when one is over the limit, the others (allowed) were still counted, as with envoyproxy/ratelimit.

The response:
- `overall_code` OVER_LIMIT when any descriptor's check was refused, else OK; one status per descriptor, in order:
  its code, `current_limit` = its tightest enforcing limit (a refusing one first, then the fewest remaining),
  `limit_remaining` (capped at 2^32 - 1) and `duration_until_reset` (until its oldest counted units leave the
  window; the whole window when that is unknown: the store did not answer). Shadow limits are never reported
  as the current limit. `current_limit.requests_per_unit` is the limit's count and `unit` its window when the
  window is exactly one second, minute, hour or day; for any other window (10 s, 7 d) `unit` is the largest of
  those not longer than the window — a true bound (no more than the count can pass in such a unit), not the
  limit itself — and `name` states the limit exactly ("requests/per-10s: 50 per 10s").
- `response_headers_to_add` (Envoy adds them to the 429 and to an allowed request's response alike), from the
  tightest limit over all descriptors: `ratelimit-limit` (its count), `ratelimit-remaining`,
  `ratelimit-reset` (seconds until reset, rounded up), and over the limit `retry-after`: whole seconds, rounded
  up, at least 1 — the longest wait of the refused descriptors; when a refused request can never pass (its cost
  exceeds a limit), the refusing limit's window; when the store did not answer, 1.
- over the limit, the 429's body (`raw_body`) is the JSON a gRPC error has through the edge's transcoder: a
  `google.rpc.Status` (code 8, RESOURCE_EXHAUSTED) with `ErrorInfo` (RATE_LIMITED), `RetryInfo` and a `QuotaFailure`
  naming each refusing limit, with `content-type: application/json` and `cache-control: no-store` (those two only
  on the 429: Envoy adds `response_headers_to_add` to an allowed request's response as well).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import json_format

from services.ratelimit.core import RateLimiter
from services.ratelimit.model import MAX_BATCH, Decision, LimitState, QuotaRequest
from services.ratelimit.servicer import duration
from tradeguard.batching import BatcherClosed, BatcherFull
from tradeguard.errors import FieldViolation, InvalidArgument, QuotaViolation, ResourceExhausted, Unavailable
from tradeguard.observability.annotations import annotate
from tradeguard.ratelimit.names import subject_for
from tradeguard.rpc.errors import to_rpc_status

__all__ = ["DOMAIN", "FULL_NAME", "RlsServicer", "current_limit", "register", "tightest"]

Context = Any  # grpc.aio.ServicerContext

DOMAIN: Final = "tradeguard"
FULL_NAME: Final = "envoy.service.ratelimit.v3.RateLimitService"
NO_VALUE: Final = "-"  # the edge's default_value for an absent key or tier
ENTRIES: Final = ("principal", "key", "tier", "method")
_UINT32_MAX: Final = 2**32 - 1
_Unit = rls_pb2.RateLimitResponse.RateLimit
_UNITS: Final = (  # longest first
    (86_400_000_000, _Unit.DAY),
    (3_600_000_000, _Unit.HOUR),
    (60_000_000, _Unit.MINUTE),
    (1_000_000, _Unit.SECOND),
)
_OK: Final = rls_pb2.RateLimitResponse.OK
_OVER_LIMIT: Final = rls_pb2.RateLimitResponse.OVER_LIMIT


def tightest(decision: Decision) -> LimitState | None:
    """The enforcing limit that binds hardest: a refusing one first, then the fewest remaining, then the smallest
    count; None when no enforcing limit applied (the operation is unlimited, or its limits are all shadow)."""
    enforcing = [state for state in decision.limits if not state.limit.shadow]
    if not enforcing:
        return None
    return min(enforcing, key=lambda s: (not s.exceeded, s.remaining, s.limit.count))


def current_limit(state: LimitState) -> rls_pb2.RateLimitResponse.RateLimit:
    """The limit as Envoy's RateLimit (see the module for windows that are not exactly one unit)."""
    window = state.limit.window_us
    unit = _Unit.SECOND
    for size, candidate in _UNITS:
        if window >= size:
            unit = candidate
            break
    return rls_pb2.RateLimitResponse.RateLimit(
        name=state.limit.description,
        requests_per_unit=min(state.limit.count, _UINT32_MAX),
        unit=unit,
    )


def _until_reset_us(state: LimitState, now_us: int) -> int:
    if state.reset_us is None:
        return state.limit.window_us
    return max(0, state.reset_us - now_us)


def _seconds_up(micros: int) -> int:
    return max(0, math.ceil(micros / 1_000_000))


def _header(key: str, value: str) -> base_pb2.HeaderValue:
    return base_pb2.HeaderValue(key=key, value=value)


class RlsServicer(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    """`ShouldRateLimit` over the rate limiter (see the module). `submit` is the service's batcher's submit
    (one QuotaRequest → its Decision); the limiter validates."""

    def __init__(self, limiter: RateLimiter, submit: Callable[[QuotaRequest], Awaitable[Decision]]) -> None:
        self._limiter = limiter
        self._submit = submit

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Context
    ) -> rls_pb2.RateLimitResponse:
        if request.domain != DOMAIN:
            raise InvalidArgument.field("domain", f"must be {DOMAIN!r}")
        if not request.descriptors:
            raise InvalidArgument.field("descriptors", "at least one descriptor")
        if len(request.descriptors) > MAX_BATCH:
            raise InvalidArgument.field("descriptors", f"at most {MAX_BATCH} descriptors")
        quotas = self._quotas(request)
        try:
            decisions: list[Decision] = list(await asyncio.gather(*(self._submit(q) for q in quotas)))
        except (BatcherFull, BatcherClosed) as error:
            raise Unavailable("the rate limiter is overloaded or stopping", reason="OVERLOADED") from error
        response = self._response(quotas, decisions)
        annotate(
            domain=request.domain,
            subjects=sorted({q.subject for q in quotas}),
            descriptors=len(quotas),
            over_limit=response.overall_code == _OVER_LIMIT,
            store_unavailable=any(d.store_unavailable for d in decisions),
        )
        return response

    def _quotas(self, request: rls_pb2.RateLimitRequest) -> list[QuotaRequest]:
        """One QuotaRequest per descriptor; every bad descriptor named at once."""
        quotas: list[QuotaRequest] = []
        violations: list[FieldViolation] = []
        for index, descriptor in enumerate(request.descriptors):
            where = f"descriptors[{index}]"
            entries: dict[str, str] = {}
            problems: list[FieldViolation] = []
            for position, entry in enumerate(descriptor.entries):
                if entry.key not in ENTRIES:
                    problems.append(
                        FieldViolation(
                            f"{where}.entries[{position}].key",
                            f"unknown entry {entry.key[:64]!r} (expected {', '.join(ENTRIES)})",
                        )
                    )
                elif entry.key in entries:
                    problems.append(
                        FieldViolation(f"{where}.entries[{position}].key", f"{entry.key} repeated")
                    )
                else:
                    entries[entry.key] = entry.value
            for needed in ("principal", "method"):
                if not entries.get(needed):
                    problems.append(FieldViolation(f"{where}.entries", f"no {needed} entry"))
            if descriptor.HasField("limit"):
                problems.append(
                    FieldViolation(
                        f"{where}.limit", "limit overrides are not accepted: the limits file decides"
                    )
                )
            if problems:
                violations += problems
                continue
            key = entries.get("key", "")
            tier = entries.get("tier", "")
            hits = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else request.hits_addend
            quota = QuotaRequest(
                subject=subject_for(entries["principal"], key if key != NO_VALUE else None),
                tier="" if tier == NO_VALUE else tier,
                operation=entries["method"].split("?", 1)[0],
                cost=hits or 1,
            )
            try:
                self._limiter.validate(quota, where)
            except InvalidArgument as error:
                violations += error.violations
                continue
            quotas.append(quota)
        if violations:
            raise InvalidArgument(violations)
        return quotas

    def _response(
        self, quotas: Sequence[QuotaRequest], decisions: Sequence[Decision]
    ) -> rls_pb2.RateLimitResponse:
        over = any(not decision.allowed for decision in decisions)
        response = rls_pb2.RateLimitResponse(overall_code=_OVER_LIMIT if over else _OK)
        binding: tuple[LimitState, Decision] | None = None
        for decision in decisions:
            status = response.statuses.add(code=_OK if decision.allowed else _OVER_LIMIT)
            state = tightest(decision)
            if state is None:
                continue
            status.current_limit.CopyFrom(current_limit(state))
            status.limit_remaining = min(state.remaining, _UINT32_MAX)
            status.duration_until_reset.CopyFrom(duration(_until_reset_us(state, decision.now_us)))
            rank = (not state.exceeded, state.remaining, state.limit.count)
            if binding is None or rank < (
                not binding[0].exceeded,
                binding[0].remaining,
                binding[0].limit.count,
            ):
                binding = (state, decision)
        if binding is not None:
            state, decision = binding
            response.response_headers_to_add.extend(
                [
                    _header("ratelimit-limit", str(state.limit.count)),
                    _header("ratelimit-remaining", str(state.remaining)),
                    _header("ratelimit-reset", str(_seconds_up(_until_reset_us(state, decision.now_us)))),
                ]
            )
        if over:
            retry_after_s = _retry_after_s(decisions)
            response.response_headers_to_add.extend(
                [
                    _header("retry-after", str(retry_after_s)),
                    _header("content-type", "application/json"),
                    _header("cache-control", "no-store"),
                ]
            )
            response.raw_body = _over_limit_body(quotas, decisions, retry_after_s)
        return response


def _over_limit_body(
    quotas: Sequence[QuotaRequest], decisions: Sequence[Decision], retry_after_s: int
) -> bytes:
    """The 429's JSON body: the google.rpc.Status the kit maps a `ResourceExhausted` to, as the transcoder prints
    it (proto field names)."""
    refusing = [
        QuotaViolation(q.subject, s.limit.description)
        for q, d in zip(quotas, decisions, strict=True)
        if not d.allowed
        for s in (d.refused_by or d.limits)
    ]
    first = refusing[0] if refusing else QuotaViolation("", "rate limit exceeded")
    error = ResourceExhausted(first.subject, first.description, retry_after_s, refusing)
    _, status, _ = to_rpc_status(error)
    return json.dumps(
        json_format.MessageToDict(status, preserving_proto_field_name=True), separators=(",", ":")
    ).encode()


def _retry_after_s(decisions: Sequence[Decision]) -> int:
    """Whole seconds (≥ 1) until every refused descriptor could pass (see the module)."""
    waits = []
    for decision in decisions:
        if decision.allowed:
            continue
        if decision.store_unavailable:
            waits.append(1_000_000)
        elif decision.retry_after_us is not None:
            waits.append(decision.retry_after_us)
        else:  # never within the limit: say the window, not "now"
            refusing = decision.refused_by or decision.limits
            waits.append(max((s.limit.window_us for s in refusing), default=1_000_000))
    return max(1, _seconds_up(max(waits, default=1_000_000)))


def register(servicer: RlsServicer) -> Callable[[Any], None]:
    """The `add_…_to_server` call of Envoy's RateLimitService, for `tradeguard.mesh.server.Service`."""

    def add(server: Any) -> None:
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(servicer, server)

    return add
