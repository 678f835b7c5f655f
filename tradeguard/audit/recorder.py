"""Recording events in the audit service (tradeguard.audit.v1): the kit's one client for it.

Every recorder — the guard's audit stage in front of a trading service, the auth service and the key vault
recording their own security events (tradeguard.audit.recording) — builds its events with `Recorder.event` and
appends them with `Recorder.record`, through ONE adaptive batcher per recorder (tradeguard.batching): an event
goes at once when no `AppendBatch` is in flight; events arriving meanwhile share the next one. `record` answers
True only once the audit service acknowledged the event (it is durable there), False when the append failed (the
audit service down or refusing, the batcher's queue full, an answer out of shape): the failure is logged (or put
on the call's log line) and counted, and the recorder is `degraded` until an append succeeds again. What a
failed append means for the recorded action is the caller's rule (fail closed: see the guard's and the recording
layer's modules).

Fields the recorder sets itself:
- `event_id`: its own (a random 64-bit prefix per process and a counter, reseeded in a forked child), nothing a
  caller sent, so that no caller's data can make a batch invalid or collide with another event;
- `clock`: the kernel's clock state (tradeguard.clock: synchronised or not, estimated and maximum error) as
  MiFID II RTS 25 asks, read at most every `CLOCK_REFRESH_S` (an adjtimex call per event would cost more than
  the state changes);
- `trace_id`: the current span's W3C trace id when the call is traced.
Caller-supplied texts are cut to `MAX_TEXT` characters; the audit service masks every event again before it
stores it (no secret, token or password is stored whatever a recorder sends).

Counters: `events` (submitted), `acknowledged`, `failed`, `rpcs` (AppendBatch calls); the batcher's own
(`batcher.batches`, `.items`, `.largest_batch`).
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import trace

from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.batching import Batcher, Outcome
from tradeguard.clock import clock_state
from tradeguard.errors import Code, DomainError
from tradeguard.observability.annotations import annotate
from tradeguard.observability.logging import get_logger
from tradeguard.rpc.status import describe_failure

__all__ = [
    "CLOCK_REFRESH_S",
    "MAX_TEXT",
    "Recorder",
    "cut",
    "handler_outcome",
    "outcome_of",
    "risk_decision",
    "status_of",
    "trace_id",
]

DEFAULT_TIMEOUT_S: Final = 2.0
DEFAULT_MAX_BATCH: Final = 256  # the audit service takes up to 1,000 per call
DEFAULT_MAX_PENDING: Final = 4096
MAX_TEXT: Final = 256
CLOCK_REFRESH_S: Final = 0.1

_log = get_logger("tradeguard.audit.recorder")


class _EventIds:
    """Event ids: a random 64-bit prefix per process and a counter (reseeded in a forked child)."""

    prefix = secrets.token_hex(8)
    counter = itertools.count()

    @classmethod
    def reseed(cls) -> None:
        cls.prefix, cls.counter = secrets.token_hex(8), itertools.count()

    @classmethod
    def next(cls) -> str:
        return f"g{cls.prefix}-{next(cls.counter):x}"


os.register_at_fork(after_in_child=_EventIds.reseed)


def cut(text: str) -> str:
    """`text` cut to MAX_TEXT characters."""
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


_DENIALS: Final[Mapping[str, pb.Outcome.ValueType]] = {
    Code.UNAUTHENTICATED.name: pb.OUTCOME_DENIED_AUTHENTICATION,
    Code.PERMISSION_DENIED.name: pb.OUTCOME_DENIED_PERMISSION,
    Code.RESOURCE_EXHAUSTED.name: pb.OUTCOME_DENIED_QUOTA,
    Code.INVALID_ARGUMENT.name: pb.OUTCOME_INVALID,
}


#: ErrorInfo reasons of a handler's refusal by a pre-trade risk check or the kill switch (tradeguard.risk)
RISK_PREFIX: Final = "RISK_"
KILL_SWITCH_ENGAGED: Final = "KILL_SWITCH_ENGAGED"


def risk_decision(error: BaseException | None) -> str:
    """The risk decision a handler's refusal carries ("RISK_PRICE_COLLAR limit=… actual=…", or the kill
    switch's reason and scope), "" for any other outcome."""
    if not isinstance(error, DomainError):
        return ""
    reason = error.reason
    if not (reason.startswith(RISK_PREFIX) or reason == KILL_SWITCH_ENGAGED):
        return ""
    values = " ".join(f"{key}={value}" for key, value in sorted(error.metadata.items()))
    return cut(f"{reason} {values}" if values else reason)


def outcome_of(error: BaseException | None, status: str) -> pb.Outcome.ValueType:
    """The outcome of a call that got past the guard: OK, DENIED_RISK (a risk check or the kill switch refused
    it: `risk_decision`), INVALID (INVALID_ARGUMENT) or FAILED."""
    if error is None:
        return pb.OUTCOME_OK
    if risk_decision(error):
        return pb.OUTCOME_DENIED_RISK
    if status == Code.INVALID_ARGUMENT.name:
        return pb.OUTCOME_INVALID
    return pb.OUTCOME_FAILED


def handler_outcome(error: BaseException | None, status: str) -> pb.Outcome.ValueType:
    """The outcome of a call whose handler decides who may do what (the auth service, the key vault): OK,
    DENIED_AUTHENTICATION, DENIED_PERMISSION, DENIED_QUOTA (a lockout), INVALID, or FAILED."""
    if error is None:
        return pb.OUTCOME_OK
    return _DENIALS.get(status, pb.OUTCOME_FAILED)


def trace_id() -> str:
    """The current span's W3C trace id (32 hex digits), or "" when the call is not traced."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


class _ClockState:
    """The kernel's clock state as an event's `Clock`, read again at most every CLOCK_REFRESH_S."""

    def __init__(self, read: Callable[[], tuple[int, int, int]]) -> None:
        self._read = read
        self._at = -CLOCK_REFRESH_S
        self._clock = pb.Clock()

    def current(self) -> pb.Clock:
        now = time.monotonic()
        if now - self._at >= CLOCK_REFRESH_S:
            sync, estimated, maximum = self._read()
            self._clock = pb.Clock(
                sync=pb.ClockSync.ValueType(int(sync)), estimated_error_us=estimated, max_error_us=maximum
            )
            self._at = now
        return self._clock


class Recorder:
    """Appends events to the audit service on `channel` (see the module): `event` builds one, `record` appends
    it and says whether it was acknowledged."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        read_clock: Callable[[], tuple[int, int, int]] = clock_state,
        name: str = "audit-recorder",
    ) -> None:
        self._stub = audit_pb2_grpc.AuditServiceStub(channel)
        self._timeout_s = timeout_s
        self._clock = _ClockState(read_clock)
        self.clock_us = clock_us
        self.batcher: Batcher[pb.Event, None] = Batcher(
            self.append_batch, max_batch=max_batch, max_pending=max_pending, name=name
        )
        self.degraded = False  # the last append failed
        self.events = 0
        self.acknowledged = 0
        self.failed = 0
        self.rpcs = 0

    async def append_batch(self, events: Sequence[pb.Event]) -> list[Outcome[None]]:
        """One AppendBatch for the whole batch (the batcher's `run_batch`): answered once durable; raises (the
        whole batch failed) when the call fails or its answer does not fit the request."""
        self.rpcs += 1
        reply = await self._stub.AppendBatch(pb.AppendBatchRequest(events=events), timeout=self._timeout_s)
        if len(reply.appended) != len(events):
            raise RuntimeError(f"{len(reply.appended)} entries for {len(events)} events")
        return [Outcome.ok(None)] * len(events)

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
        risk: str = "",
        request_id: str = "",
        cause: str = "",
        details: Mapping[str, str] | None = None,
        event_id: str = "",
    ) -> pb.Event:
        """An event (see the module for the fields the recorder sets); a fresh event id unless `event_id` is
        given. `cause` is `details["cause"]` (what was wrong, never the credential)."""
        event = pb.Event(
            event_id=event_id or _EventIds.next(),
            time=Timestamp(seconds=time_us // 1_000_000, nanos=time_us % 1_000_000 * 1000),
            clock=self._clock.current(),
            principal=cut(principal),
            account_id=cut(account_id),
            api_key_id=cut(api_key_id),
            caller=cut(caller),
            source_ip=cut(source_ip),
            method=cut(method),
            resource=cut(resource),
            action=cut(action),
            quota_decision=quota,
            risk_decision=risk,
            outcome=outcome,
            status_code=status,
            request_id=cut(request_id),
            trace_id=trace_id(),
            latency=Duration(seconds=latency_us // 1_000_000, nanos=latency_us % 1_000_000 * 1000),
        )
        if details:
            for key, value in details.items():
                event.details[cut(key)] = cut(value)
        if cause:
            event.details["cause"] = cut(cause)
        return event

    async def record(self, event: pb.Event) -> bool:
        """Append `event`: True once the audit service acknowledged it, False when the append failed (logged and
        counted, the recorder degraded). Never raises but for cancellation."""
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

    async def close(self) -> None:
        """Close the batcher: the events still queued are sent first."""
        await self.batcher.close()
