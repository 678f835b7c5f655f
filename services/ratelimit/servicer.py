"""RateLimitService over gRPC: proto ↔ core (services/ratelimit/core.py), nothing else.

The mesh's authorisation interceptor has already checked the caller against services/ratelimit/policy.py; errors
are the core's DomainErrors (the kit maps them). What the servicer adds:
- validation, by proto field name: `check.subject`, `check.tier`, `check.operation`, `check.cost`; in a batch
  `checks[i].…` for every bad check at once, `checks` itself when empty or longer than MAX_BATCH; `subject` of
  ResetSubject. `cost` 0 means 1.
- one store round trip for many concurrent CheckQuota calls: each unary call's request goes through a `Batcher`
  (tradeguard.batching) in front of `RateLimiter.check`, so while one batch is at the store the next calls queue
  and go together (no added latency when idle: a lone call goes at once). CheckQuotaBatch (the guards' own
  batches) and GetQuota call the core directly, one store round trip each. A full queue is UNAVAILABLE.
- a `Decision` as a `QuotaDecision`: µs → Duration / Timestamp; `retry_after` set only when refused and a retry
  can ever succeed; `reset_time` unset when nothing is counted (or the store did not answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from google.protobuf import duration_pb2, timestamp_pb2

from services.ratelimit.core import RateLimiter
from services.ratelimit.model import MAX_BATCH, Decision, QuotaRequest
from services.ratelimit.reload import LimitsFile
from tradeguard.batching import Batcher, BatcherClosed, BatcherFull, Outcome
from tradeguard.errors import FieldViolation, InvalidArgument, Unavailable
from tradeguard.observability.annotations import annotate
from tradeguard.ratelimit.names import SUBJECT_PATTERN
from tradeguard.ratelimit.v1 import ratelimit_pb2 as pb
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc

__all__ = ["CHECK_BATCH", "RateLimitServicer", "decision_proto", "duration", "request_of", "timestamp"]

Context = Any  # grpc.aio.ServicerContext

CHECK_BATCH: Final = 256  # unary CheckQuota calls per store round trip, at most


def timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, us = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=us * 1000)


def duration(micros: int) -> duration_pb2.Duration:
    seconds, us = divmod(max(0, micros), 1_000_000)
    return duration_pb2.Duration(seconds=seconds, nanos=us * 1000)


def request_of(check: pb.QuotaCheck) -> QuotaRequest:
    """The core's request for a proto check (`cost` 0 → 1)."""
    return QuotaRequest(
        subject=check.subject, tier=check.tier, operation=check.operation, cost=check.cost or 1
    )


def decision_proto(decision: Decision) -> pb.QuotaDecision:
    out = pb.QuotaDecision(
        allowed=decision.allowed, tier=decision.tier, store_unavailable=decision.store_unavailable
    )
    for state in decision.limits:
        status = out.limits.add(
            name=state.limit.name,
            group=state.limit.group,
            limit=state.limit.count,
            remaining=state.remaining,
            exceeded=state.exceeded,
            shadow=state.limit.shadow,
        )
        status.window.CopyFrom(duration(state.limit.window_us))
        if state.reset_us is not None:
            status.reset_time.CopyFrom(timestamp(state.reset_us))
    if not decision.allowed and decision.retry_after_us is not None:
        out.retry_after.CopyFrom(duration(decision.retry_after_us))
    return out


class RateLimitServicer(ratelimit_pb2_grpc.RateLimitServiceServicer):
    """Every RPC of tradeguard.ratelimit.v1.RateLimitService over the core (see the module)."""

    def __init__(self, limiter: RateLimiter, limits: LimitsFile, *, max_batch: int = CHECK_BATCH) -> None:
        self._limiter = limiter
        self.limits = limits
        self.batcher: Batcher[QuotaRequest, Decision] = Batcher(
            self._check_batch, max_batch=max_batch, name="ratelimit.check"
        )

    async def _check_batch(self, requests: Sequence[QuotaRequest]) -> list[Outcome[Decision]]:
        return [Outcome.ok(decision) for decision in await self._limiter.check(requests)]

    async def close(self) -> None:
        await self.batcher.close()

    def _annotate(self, request: QuotaRequest, decision: Decision) -> None:
        annotate(
            subject=request.subject,
            operation=request.operation,
            tier=decision.tier,
            allowed=decision.allowed,
            store_unavailable=decision.store_unavailable,
        )

    async def CheckQuota(self, request: pb.CheckQuotaRequest, context: Context) -> pb.CheckQuotaResponse:
        quota = request_of(request.check)
        self._limiter.validate(quota, "check")
        try:
            decision = await self.batcher.submit(quota)
        except (BatcherFull, BatcherClosed) as error:
            raise Unavailable("the rate limiter is overloaded or stopping", reason="OVERLOADED") from error
        self._annotate(quota, decision)
        return pb.CheckQuotaResponse(decision=decision_proto(decision))

    async def CheckQuotaBatch(
        self, request: pb.CheckQuotaBatchRequest, context: Context
    ) -> pb.CheckQuotaBatchResponse:
        if not request.checks:
            raise InvalidArgument.field("checks", "at least one check")
        if len(request.checks) > MAX_BATCH:
            raise InvalidArgument.field("checks", f"at most {MAX_BATCH} checks, got {len(request.checks)}")
        quotas = [request_of(check) for check in request.checks]
        violations: list[FieldViolation] = []
        for index, quota in enumerate(quotas):
            try:
                self._limiter.validate(quota, f"checks[{index}]")
            except InvalidArgument as error:
                violations += error.violations
        if violations:
            raise InvalidArgument(violations)
        decisions = await self._limiter.check(quotas)
        annotate(checks=len(quotas), refused=sum(1 for d in decisions if not d.allowed))
        return pb.CheckQuotaBatchResponse(decisions=[decision_proto(d) for d in decisions])

    async def GetQuota(self, request: pb.GetQuotaRequest, context: Context) -> pb.GetQuotaResponse:
        quota = request_of(request.check)
        self._limiter.validate(quota, "check")
        (decision,) = await self._limiter.check([quota], consume=False)
        self._annotate(quota, decision)
        return pb.GetQuotaResponse(decision=decision_proto(decision))

    async def ResetSubject(
        self, request: pb.ResetSubjectRequest, context: Context
    ) -> pb.ResetSubjectResponse:
        if SUBJECT_PATTERN.fullmatch(request.subject) is None:
            raise InvalidArgument.field(
                "subject", "1 to 128 characters of A-Z a-z 0-9 _ . : @ / - (e.g. key:tgk_… or user:usr_…)"
            )
        cleared = await self._limiter.reset(request.subject)
        annotate(subject=request.subject, counters_cleared=cleared)
        return pb.ResetSubjectResponse(counters_cleared=cleared)

    async def GetLimits(self, request: pb.GetLimitsRequest, context: Context) -> pb.GetLimitsResponse:
        limits = self.limits
        current = limits.current
        return pb.GetLimitsResponse(
            source=current.source,
            sha256=current.sha256,
            loaded_time=timestamp(limits.loaded_us),
            tiers=sorted(current.tiers),
            last_error=limits.last_error,
        )
