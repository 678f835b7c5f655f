"""The guard's audit stage: every guarded call is recorded by the audit service (tradeguard.audit.v1), fail closed.

One `tradeguard.audit.v1.Event` per call, appended through ONE adaptive batcher per guard (tradeguard.batching:
an event goes at once when no `AppendBatch` is in flight; events arriving meanwhile share the next one):

- **Accepted** (authenticated, authorised, within quota): the event (outcome `OUTCOME_OK`, status `OK`) is sent
  as the call is let through and its append runs CONCURRENTLY with the handler; the response is released only
  once the audit service has acknowledged it (durable). Its `latency` is the guard's own time (from the call
  reaching the guard to its acceptance): the handler's is not known when the event is sent.
- **The handler failed** (or a later check refused the call): a SECOND, small event for the same call —
  `event_id` the first one's plus `.f`, the same request id — with the handler's outcome (`OUTCOME_INVALID` for
  INVALID_ARGUMENT, `OUTCOME_FAILED` otherwise), its status code name and the whole call's latency; awaited
  before the error is returned (its append failing leaves the error as it was: a failure is never a success).
- **Refused** by authentication (`OUTCOME_DENIED_AUTHENTICATION`; the opaque error's cause in `details["cause"]`,
  never a token or signature: the guard's causes name what was wrong, not the credential), by permission
  (`OUTCOME_DENIED_PERMISSION`) or by quota (`OUTCOME_DENIED_QUOTA`; a quota service unavailable is
  `OUTCOME_FAILED`, status UNAVAILABLE): recorded BEFORE the refusal is returned; the refusal stands whether or
  not its append succeeded.

**Fail closed.** The append of an accepted call failing (the audit service down or refusing, the batcher's queue
full, an answer out of shape) fails the call with UNAVAILABLE: ErrorInfo reason `OUTCOME_UNKNOWN` when the handler
ran (it completed — an order may be stored — or failed with something other than a DomainError), never a success;
reason `AUDIT_UNAVAILABLE` when the handler refused the call itself (a DomainError: nothing was done). After a
failed append the stage is `degraded`: accepted calls then append FIRST and run their handler only once the event
is acknowledged (UNAVAILABLE, reason `AUDIT_UNAVAILABLE`, handler never run, otherwise), so while the audit service
is down no further handler runs unaudited; the first acknowledged append makes the stage concurrent again.

Fields: `event_id` (the guard's own: a random 64-bit prefix per process and a counter, nothing a caller sent, so
that no caller's data can make a batch invalid), `time` (µs, when the call reached the guard), `clock`
UNSPECIFIED (the kernel's clock state is read by the audit service's own module; the kit does not read
adjtimex), principal, account (the principal's; the request's `account_id` for a call refused before
authentication), API key id (the principal's; for a signed call refused before a principal, the key id it
claimed — verified when the auth service refused it for permission, not for an authentication refusal), the
caller's SPIFFE ID, source IP, method, `resource` (the request's `order_id` or
`client_order_id` when it has one), `action` (the permission the method needs), quota decision (`allowed`,
`refused: <limit>`, `unavailable`, `edge` for calls counted by the edge, empty when not counted), outcome, status
code name, request id and W3C trace id (when the call is traced), latency. Caller-supplied texts are cut to
`MAX_TEXT` characters. The audit service masks every event again before it stores it.

Counters: `events` (submitted), `acknowledged`, `failed` (appends that failed), `unknown_outcomes` (calls answered
OUTCOME_UNKNOWN), `refused_degraded` (calls refused before their handler while degraded), `rpcs` (AppendBatch
calls); the batcher's own (`batcher.batches`, `.items`, `.largest_batch`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Final

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.batching import Batcher, Outcome
from tradeguard.errors import Code, DomainError, ResourceExhausted, Unavailable
from tradeguard.observability.annotations import annotate
from tradeguard.observability.logging import get_logger
from tradeguard.rpc.status import describe_failure

__all__ = [
    "AUDIT_UNAVAILABLE",
    "OUTCOME_UNKNOWN",
    "AuditStage",
    "outcome_of",
    "status_of",
]

DEFAULT_TIMEOUT_S: Final = 2.0
DEFAULT_MAX_BATCH: Final = 256  # the audit service takes up to 1,000 per call
DEFAULT_MAX_PENDING: Final = 4096
MAX_TEXT: Final = 256
OUTCOME_UNKNOWN: Final = "OUTCOME_UNKNOWN"
AUDIT_UNAVAILABLE: Final = "AUDIT_UNAVAILABLE"
UNAVAILABLE_MESSAGE: Final = "audit service unavailable"

_log = get_logger("tradeguard.guard.audit")


class _EventIds:
    """The guard's event ids: a random 64-bit prefix per process and a counter (reseeded in a forked child)."""

    prefix = secrets.token_hex(8)
    counter = itertools.count()

    @classmethod
    def reseed(cls) -> None:
        cls.prefix, cls.counter = secrets.token_hex(8), itertools.count()

    @classmethod
    def next(cls) -> str:
        return f"g{cls.prefix}-{next(cls.counter):x}"


os.register_at_fork(after_in_child=_EventIds.reseed)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT]


def status_of(
    error: BaseException | None, context: grpc.aio.ServicerContext[object, object] | None = None
) -> str:
    """The gRPC status code name a call ends with: OK, a DomainError's code, the code a handler aborted with,
    INTERNAL otherwise."""
    if error is None:
        return "OK"
    if isinstance(error, DomainError):
        return error.code.name
    if context is not None:
        code = context.code()
        if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
            return code.name
    return "INTERNAL"


def outcome_of(error: BaseException | None, status: str) -> pb.Outcome.ValueType:
    """The outcome of a call that got past the guard: OK, INVALID (INVALID_ARGUMENT) or FAILED."""
    if error is None:
        return pb.OUTCOME_OK
    if status == Code.INVALID_ARGUMENT.name:
        return pb.OUTCOME_INVALID
    return pb.OUTCOME_FAILED


def quota_refusal(error: ResourceExhausted) -> str:
    return _cut(f"refused: {error.limit_description}")


def trace_id() -> str:
    """The current span's W3C trace id (32 hex digits), or "" when the call is not traced."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


class AuditStage:
    """The guard's audit stage (see the module): `event` builds a call's event, `record` appends it and says
    whether it was acknowledged, `start` does so beside the handler."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        self._stub = audit_pb2_grpc.AuditServiceStub(channel)
        self._timeout_s = timeout_s
        self.clock_us = clock_us
        self.batcher: Batcher[pb.Event, None] = Batcher(
            self.append_batch, max_batch=max_batch, max_pending=max_pending, name="guard-audit"
        )
        self.degraded = False  # the last append failed: accepted calls append before their handler
        self.events = 0
        self.acknowledged = 0
        self.failed = 0
        self.unknown_outcomes = 0
        self.refused_degraded = 0
        self.rpcs = 0

    # --- the batch call ----------------------------------------------------------------------------------------

    async def append_batch(self, events: Sequence[pb.Event]) -> list[Outcome[None]]:
        """One AppendBatch for the whole batch (the batcher's `run_batch`): answered once durable; raises (the
        whole batch failed) when the call fails or its answer does not fit the request."""
        self.rpcs += 1
        reply = await self._stub.AppendBatch(pb.AppendBatchRequest(events=events), timeout=self._timeout_s)
        if len(reply.appended) != len(events):
            raise RuntimeError(f"{len(reply.appended)} entries for {len(events)} events")
        return [Outcome.ok(None)] * len(events)

    # --- per call ----------------------------------------------------------------------------------------------

    def event(
        self,
        *,
        time_us: int,
        method: str,
        outcome: pb.Outcome.ValueType,
        status: str,
        latency_us: int,
        principal: str = "",
        account_id: str = "",
        api_key_id: str = "",
        caller: str = "",
        source_ip: str = "",
        resource: str = "",
        action: str = "",
        quota: str = "",
        request_id: str = "",
        cause: str = "",
        event_id: str = "",
    ) -> pb.Event:
        """A call's event (see the module for the fields); a fresh event id unless `event_id` is given."""
        event = pb.Event(
            event_id=event_id or _EventIds.next(),
            time=Timestamp(seconds=time_us // 1_000_000, nanos=time_us % 1_000_000 * 1000),
            principal=_cut(principal),
            account_id=_cut(account_id),
            api_key_id=_cut(api_key_id),
            caller=_cut(caller),
            source_ip=_cut(source_ip),
            method=_cut(method),
            resource=_cut(resource),
            action=action,
            quota_decision=quota,
            outcome=outcome,
            status_code=status,
            request_id=_cut(request_id),
            trace_id=trace_id(),
            latency=Duration(seconds=latency_us // 1_000_000, nanos=latency_us % 1_000_000 * 1000),
        )
        if cause:
            event.details["cause"] = _cut(cause)
        return event

    async def record(self, event: pb.Event) -> bool:
        """Append `event`: True once the audit service acknowledged it, False when the append failed (logged and
        counted, the stage degraded). Never raises but for cancellation."""
        self.events += 1
        try:
            await self.batcher.submit(event)
        except Exception as error:
            self.failed += 1
            self.degraded = True
            cause = describe_failure(error)
            if not annotate(audit="failed", audit_cause=cause):
                _log.warning("audit_append_failed", cause=cause)
            return False
        self.acknowledged += 1
        self.degraded = False
        return True

    def start(self, event: pb.Event) -> asyncio.Task[bool]:
        """`record(event)` started beside the caller (the handler runs meanwhile)."""
        return asyncio.ensure_future(self.record(event))

    def unknown(self, handler_error: BaseException | None) -> Unavailable:
        """The error for a call whose accepted event was not acknowledged (see the module)."""
        if isinstance(handler_error, DomainError):
            return Unavailable(UNAVAILABLE_MESSAGE, reason=AUDIT_UNAVAILABLE)
        self.unknown_outcomes += 1
        return Unavailable(
            "audit service unavailable: the call's outcome is unknown (it may have taken effect)",
            reason=OUTCOME_UNKNOWN,
        )

    def refused_before_handler(self) -> Unavailable:
        """The error for an accepted call whose event was not acknowledged before its handler (degraded)."""
        self.refused_degraded += 1
        return Unavailable(UNAVAILABLE_MESSAGE, reason=AUDIT_UNAVAILABLE)

    async def close(self) -> None:
        await self.batcher.close()
