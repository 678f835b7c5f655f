"""The guard's quota stage: each verified call is counted by the rate-limit service before its handler runs.

Per call, one check of the verified principal against the rate-limit service (tradeguard.ratelimit.v1,
CheckQuotaBatch), through ONE adaptive batcher per guard (tradeguard.batching: a call goes at once when no batch is
in flight; calls arriving meanwhile share the next one; a batch waits up to `fill_turns` event-loop turns, default
25, for more calls before it is sent — never a timer). The check:

- subject `key:<api key id>` for a signed API-key call, `user:<user id>` for a bearer-token call; the principal's
  tier ("" or a tier the limits file does not define: its default tier); the operation is the full gRPC method;
  cost 1 (the limits file weighs each operation);
- allowed → None; refused → `ResourceExhausted` (RESOURCE_EXHAUSTED with RetryInfo, QuotaFailure and a whole-second
  `retry-after` trailer, by the kit's mapping): its `limit_description` is the tightest refusing limit's (fewest
  remaining; on a tie the longer window), `retry_after_seconds` the decision's retry delay (a request that can never
  pass — its weight exceeds a limit — gets the longest refusing window), one `QuotaViolation` per refusing limit
  (shadow limits never refuse);
- FAIL CLOSED: the rate-limit service unreachable, failing, answering out of shape, the batcher's queue full, or the
  service's own store down for a fail-closed limit (a decision refused with `store_unavailable`) →
  `Unavailable("rate-limit service unavailable")`; the cause goes on the RPC's log line (`quota_cause`), never the
  caller's credentials (nothing of them reaches this stage: only the subject, tier and method);
- a subject, tier or method that the rate-limit service would refuse as malformed never reaches it (one malformed
  item would fail its whole batch, everyone's calls with it): a malformed tier is sent as "" (the default tier),
  a malformed subject or method is refused here (Unavailable, fail closed).

**Concurrently with authentication.** A signed call needs the auth service's RPC before its principal (and its
key's tier) is known. For a key this guard has already seen VERIFIED — a bounded LRU (default 10,000 entries) of
(key id, caller workload) → (tier, scopes), filled only from principals the auth service returned — `start_early`
starts the check at once, beside the auth RPC, so the call pays one round trip instead of two. Its verdict counts
only if authentication and authorisation pass (`finish_early`); otherwise it is discarded (`discard`: cancelled if
still queued, never left running unobserved). If the verified principal's tier is not the one the early check
used (the key's tier changed), the early verdict is discarded and the call is checked again under the verified tier.
The cache is keyed by the caller's workload as well as the key id, and an early check starts only when the cached
scopes hold the method's permission: a caller that merely knows a key id (a forged signature, from another
workload) or a key refused for permission is checked after authentication, so it spends none of that key's quota.
(A forged signature from the key's own workload is counted before auth refuses it: the price of the one round
trip, bounded by that workload's own traffic.)

Counters: `checks` (calls checked), `concurrent_checks` (started beside the auth RPC), `refused`, `unavailable`;
the batcher's own (`batcher.batches`, `.items`, `.largest_batch`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import grpc

from tradeguard.batching import Batcher, BatcherClosed, BatcherFull, Outcome
from tradeguard.errors import DomainError, QuotaViolation, ResourceExhausted, Unavailable
from tradeguard.observability.annotations import annotate
from tradeguard.observability.logging import get_logger
from tradeguard.observability.redact import Trusted
from tradeguard.principal import Principal
from tradeguard.ratelimit.names import (
    NAME_PATTERN,
    OPERATION_PATTERN,
    SUBJECT_PATTERN,
    limit_text,
    subject_for,
)
from tradeguard.ratelimit.v1 import ratelimit_pb2 as pb
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc
from tradeguard.rpc.status import describe_failure

__all__ = ["EarlyCheck", "QuotaCheck", "QuotaStage", "limit_description", "subject_of"]

DEFAULT_TIMEOUT_S: Final = 2.0
DEFAULT_MAX_BATCH: Final = 256  # the service takes up to 1,000 per call
DEFAULT_MAX_PENDING: Final = 4096
DEFAULT_KNOWN_KEYS: Final = 10_000
DEFAULT_FILL_TURNS: Final = 25  # event-loop turns a batch waits to fill (tradeguard.batching `fill_turns`)
DEFAULT_FILL_PATIENCE: Final = 0  # no limit (`fill_patience`: stop after that many quiet turns in a row)
UNAVAILABLE_MESSAGE: Final = "rate-limit service unavailable"
# the kit's own words on the RPC's log line (Trusted: written as they are)
_ALLOWED_WORD: Final = Trusted("allowed")
_AFTER_AUTH: Final = Trusted("after_auth")
_CONCURRENT: Final = Trusted("concurrent")


_log = get_logger("tradeguard.guard.quota")


@dataclass(frozen=True, slots=True)
class QuotaCheck:
    """One call to count: what goes into the batch's `QuotaCheck` message."""

    subject: str
    tier: str
    operation: str


@dataclass(frozen=True, slots=True)
class _Known:
    tier: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What one check came to, before it is applied to the call: allowed (error None), refused, unavailable."""

    outcome: str  # "allowed" | "exhausted" | "unavailable"
    error: DomainError | None = None
    cause: str = ""
    limit: str = ""


_ALLOWED: Final = _Verdict("allowed")


@dataclass(frozen=True, slots=True)
class EarlyCheck:
    """A check started beside the auth RPC (see the module): for `key_id` under `tier`."""

    key_id: str
    tier: str
    task: asyncio.Task[_Verdict]


def subject_of(principal: Principal) -> str:
    """Who is counted: the API key for a signed call, else the user."""
    return subject_for(principal.user_id, principal.key_id)


def limit_description(status: pb.LimitStatus) -> str:
    """A limit as QuotaFailure and the logs name it: "orders/per-second: 10 per 1s" (the rate limiter's
    `Limit.description`)."""
    window_us = status.window.ToMicroseconds()
    return limit_text(status.group, status.name, status.limit, window_us)


def _retrieve(task: asyncio.Task[_Verdict]) -> None:
    """Mark a finished task's exception as retrieved: a discarded early check never warns at collection."""
    if not task.cancelled():
        task.exception()


class QuotaStage:
    """The guard's quota stage (see the module): `check`, and `start_early` / `finish_early` / `discard` for a
    signed call whose key is known."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        known_keys: int = DEFAULT_KNOWN_KEYS,
        fill_turns: int = DEFAULT_FILL_TURNS,
        fill_patience: int = DEFAULT_FILL_PATIENCE,
    ) -> None:
        if known_keys < 0:
            raise ValueError(f"known_keys must be 0 or more, not {known_keys}")
        self._stub = ratelimit_pb2_grpc.RateLimitServiceStub(channel)
        self._timeout_s = timeout_s
        self.batcher: Batcher[QuotaCheck, _Verdict] = Batcher(
            self.check_batch,
            max_batch=max_batch,
            max_pending=max_pending,
            fill_turns=fill_turns,
            fill_patience=fill_patience,
            name="guard-quota",
        )
        self._known: OrderedDict[tuple[str, str], _Known] = OrderedDict()
        self._known_max = known_keys
        self.checks = 0
        self.concurrent_checks = 0
        self.refused = 0
        self.unavailable = 0
        self.rpcs = 0  # CheckQuotaBatch calls made

    # --- the batch call ----------------------------------------------------------------------------------------

    async def check_batch(self, checks: Sequence[QuotaCheck]) -> list[Outcome[_Verdict]]:
        """One CheckQuotaBatch for the whole batch: one verdict per check, in order (the batcher's `run_batch`).
        Raises (the whole batch unavailable) when the call fails or its answer does not fit the request."""
        self.rpcs += 1
        reply = await self._stub.CheckQuotaBatch(
            pb.CheckQuotaBatchRequest(
                checks=[pb.QuotaCheck(subject=c.subject, tier=c.tier, operation=c.operation) for c in checks]
            ),
            timeout=self._timeout_s,
        )
        if len(reply.decisions) != len(checks):
            raise RuntimeError(f"{len(reply.decisions)} decisions for {len(checks)} checks")
        return [Outcome.ok(_verdict(c.subject, d)) for c, d in zip(checks, reply.decisions, strict=True)]

    # --- per call ----------------------------------------------------------------------------------------------

    async def check(self, principal: Principal, method: str) -> None:
        """Count one call of `method` by the verified `principal`: None when allowed; `ResourceExhausted` or
        `Unavailable` (see the module)."""
        self.checks += 1
        verdict = await self._decide(subject_of(principal), principal.tier, method)
        self._apply(verdict, _AFTER_AUTH)

    def remember(self, principal: Principal, caller: str) -> None:
        """A principal the auth service verified for a signed call from workload `caller`: its key's tier and
        scopes are known from now on (for `start_early`)."""
        if principal.key_id is None or self._known_max == 0:
            return
        entry = (principal.key_id, caller)
        self._known[entry] = _Known(principal.tier, principal.scopes)
        self._known.move_to_end(entry)
        while len(self._known) > self._known_max:
            self._known.popitem(last=False)

    def known(self, key_id: str, caller: str) -> str | None:
        """The tier last verified for `key_id` from `caller`, or None."""
        known = self._known.get((key_id, caller))
        return None if known is None else known.tier

    def start_early(self, key_id: str, caller: str, method: str, permission: str) -> EarlyCheck | None:
        """Start the check of a signed call beside its auth RPC, if its key is known from `caller` with the
        permission (else None: check after authentication)."""
        entry = (key_id, caller)
        known = self._known.get(entry)
        if known is None or permission not in known.scopes:
            return None
        self._known.move_to_end(entry)
        self.checks += 1
        self.concurrent_checks += 1
        task = asyncio.ensure_future(self._decide(subject_for("", key_id), known.tier, method))
        task.add_done_callback(_retrieve)
        return EarlyCheck(key_id, known.tier, task)

    async def finish_early(self, early: EarlyCheck, principal: Principal, method: str) -> None:
        """Apply an early check to the call, now that `principal` is authenticated and authorised (checked again
        under the verified tier if it is not the one the early check used)."""
        if principal.key_id != early.key_id or principal.tier != early.tier:
            await self.discard(early)
            await self.check(principal, method)
            return
        verdict = await early.task
        self._apply(verdict, _CONCURRENT)

    async def discard(self, early: EarlyCheck) -> None:
        """Drop an early check whose call was refused (or was re-checked): cancelled (never sent if still
        queued; its batch answers without it otherwise), awaited, its verdict unused."""
        task = early.task
        if not task.done():
            task.cancel()
            await asyncio.wait([task])  # raises only if this caller is cancelled meanwhile

    async def close(self) -> None:
        await self.batcher.close()

    # --- internals ---------------------------------------------------------------------------------------------

    async def _decide(self, subject: str, tier: str, method: str) -> _Verdict:
        """The verdict of one check (never raises but for cancellation: `_apply` raises on the caller's side)."""
        if SUBJECT_PATTERN.fullmatch(subject) is None:
            return _Verdict("unavailable", cause="subject not countable")
        if OPERATION_PATTERN.fullmatch(method) is None:
            return _Verdict("unavailable", cause="method not countable")
        item = QuotaCheck(subject, tier if NAME_PATTERN.fullmatch(tier) else "", method)
        try:
            return await self.batcher.submit(item)
        except (BatcherFull, BatcherClosed) as error:
            return _Verdict("unavailable", cause=f"quota check refused ({type(error).__name__})")
        except Exception as error:
            return _Verdict("unavailable", cause=f"rate-limit service failed ({describe_failure(error)})")

    def _apply(self, verdict: _Verdict, path: str) -> None:
        """Annotate the RPC's log line with the verdict; raise its error if it refuses."""
        if verdict.outcome == "allowed":
            annotate(quota=_ALLOWED_WORD, quota_path=path)
            return
        if verdict.outcome == "exhausted":
            self.refused += 1
            annotate(quota="exhausted", quota_path=path, quota_limit=verdict.limit)
        else:
            self.unavailable += 1
            if not annotate(quota="unavailable", quota_path=path, quota_cause=verdict.cause):
                _log.warning("quota_unavailable", cause=verdict.cause)
        raise verdict.error or Unavailable(UNAVAILABLE_MESSAGE)


def _verdict(subject: str, decision: pb.QuotaDecision) -> _Verdict:
    """A decision of the rate-limit service as a verdict for the call (see the module)."""
    if decision.allowed:
        return _ALLOWED
    if decision.store_unavailable:
        return _Verdict("unavailable", cause="rate-limit store unavailable (a fail-closed limit)")
    refusing = [limit for limit in decision.limits if limit.exceeded and not limit.shadow]
    if not refusing:
        return _Verdict("unavailable", cause="refused with no refusing limit")
    tightest = min(refusing, key=lambda limit: (limit.remaining, -limit.window.ToMicroseconds()))
    if decision.HasField("retry_after"):
        retry_after_s = max(decision.retry_after.ToMicroseconds(), 0) / 1_000_000
    else:  # it can never pass as asked: no sooner than the longest refusing window
        retry_after_s = max(limit.window.ToMicroseconds() for limit in refusing) / 1_000_000
    description = limit_description(tightest)
    error = ResourceExhausted(
        subject,
        description,
        retry_after_s,
        [QuotaViolation(subject, limit_description(limit)) for limit in refusing],
    )
    return _Verdict("exhausted", error=error, limit=description)
