"""The guard's audit stage: every guarded call is recorded by the audit service (tradeguard.audit.v1), fail closed.

One `tradeguard.audit.v1.Event` per call, appended through ONE adaptive batcher per guard (tradeguard.batching:
an event goes at once when no `AppendBatch` is in flight; events arriving meanwhile share the next one; a batch
waits up to `fill_turns` event-loop turns, default 25, for more events before it is sent — never a timer):

- **Accepted** (authenticated, authorised, within quota): the event (outcome `OUTCOME_OK`, status `OK`) is sent
  as the call is let through. For a method that takes effect (a service's `effect_methods`: an order placed or
  cancelled, a kill switch, a limit) it is WRITE-AHEAD: the handler runs only once the audit service has
  acknowledged the event (durable), so that no crash of the service — a kill -9 between the handler's commit and
  the append — can leave an effect without its event; if it is not acknowledged the call is refused UNAVAILABLE
  (`AUDIT_UNAVAILABLE`) and the handler never runs. For the other methods (reads), or with the guard's
  `AUDIT_WRITE_AHEAD` off, its append runs CONCURRENTLY with the handler and the response is released only once
  it is acknowledged. Its `latency` is the guard's own time (from the call reaching the guard to its
  acceptance): the handler's is not known when the event is sent.
- **The handler failed** (or a later check refused the call): a SECOND, small event for the same call —
  `event_id` the first one's plus `.f`, the same request id — with the handler's outcome (`OUTCOME_DENIED_RISK`
  for a refusal by a pre-trade risk check or the kill switch, its `risk_decision` the reason and the values that
  failed; `OUTCOME_INVALID` for INVALID_ARGUMENT; `OUTCOME_FAILED` otherwise), its status code name and the whole call's latency; awaited
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

Fields: as every recorder's (tradeguard.audit.recorder: the recorder's own `event_id`, the kernel's `clock` state,
`trace_id`), and principal, account (the principal's; the request's `account_id` for a call refused before
authentication), API key id (the principal's; for a signed call refused before a principal, the key id it
claimed — verified when the auth service refused it for permission, not for an authentication refusal), the
caller's SPIFFE ID, source IP, method, `resource` (the request's `order_id` or `client_order_id` when it has
one), for an order (a request message with the fields `symbol`, `side`, `quantity` and `price`) those four in
`details` — `side` by its enum value's name (`SIDE_BUY`), a market order's empty `price` left out, each cut like
the other texts, nothing else of the request; as requested: the accepted event is built before the handler runs —,
`action` (the permission the method needs), quota decision (`allowed`, `refused: <limit>`, `unavailable`,
`edge` for calls counted by the edge, empty when not counted), outcome, status code name, request id, latency.

Counters: the recorder's (`events`, `acknowledged`, `failed`, `rpcs`, the batcher's), `unknown_outcomes` (calls
answered OUTCOME_UNKNOWN), `refused_degraded` (calls refused before their handler because their event was not
acknowledged: write-ahead, or while degraded).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import grpc

from tradeguard.audit.recorder import Recorder, cut, outcome_of, status_of, trace_id
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.errors import DomainError, ResourceExhausted, Unavailable

__all__ = [
    "AUDIT_UNAVAILABLE",
    "OUTCOME_UNKNOWN",
    "AuditStage",
    "outcome_of",
    "quota_refusal",
    "status_of",
    "trace_id",
]

OUTCOME_UNKNOWN: Final = "OUTCOME_UNKNOWN"
AUDIT_UNAVAILABLE: Final = "AUDIT_UNAVAILABLE"
UNAVAILABLE_MESSAGE: Final = "audit service unavailable"
DEFAULT_FILL_TURNS: Final = 25  # event-loop turns a batch waits to fill (tradeguard.batching `fill_turns`)
DEFAULT_FILL_PATIENCE: Final = 0  # no limit (`fill_patience`: stop after that many quiet turns in a row)


def quota_refusal(error: ResourceExhausted) -> str:
    return cut(f"refused: {error.limit_description}")


class AuditStage(Recorder):
    """The guard's audit stage (see the module): a `Recorder` (`event` builds a call's event, `record` appends
    it and says whether it was acknowledged) that also `start`s a record beside the handler and names the error
    of a call whose event was not acknowledged."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        clock_us: Callable[[], int] | None = None,
        fill_turns: int = DEFAULT_FILL_TURNS,
        fill_patience: int = DEFAULT_FILL_PATIENCE,
    ) -> None:
        if clock_us is None:
            super().__init__(channel, name="guard-audit")
        else:
            super().__init__(channel, clock_us=clock_us, name="guard-audit")
        if fill_turns < 0:
            raise ValueError(f"fill_turns must be 0 or more, not {fill_turns}")
        if fill_patience < 0:
            raise ValueError(f"fill_patience must be 0 or more, not {fill_patience}")
        self.batcher.fill_turns = fill_turns
        self.batcher.fill_patience = fill_patience
        self.unknown_outcomes = 0
        self.refused_degraded = 0

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
        """The error for an accepted call whose event was not acknowledged before its handler (write-ahead, or
        degraded)."""
        self.refused_degraded += 1
        return Unavailable(UNAVAILABLE_MESSAGE, reason=AUDIT_UNAVAILABLE)
