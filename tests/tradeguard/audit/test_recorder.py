"""The kit's recorder (tradeguard.audit.recorder) without a server: outcomes and risk decisions of a handler's
error, the clock state read at most every CLOCK_REFRESH_S, texts cut, details kept. Appending for real is tested
against the real audit service (tests/tradeguard/guard/test_audit.py, tests/tradeguard/audit/test_recording.py)."""

from __future__ import annotations

from decimal import Decimal

import grpc

from tradeguard.audit.recorder import MAX_TEXT, Recorder, handler_outcome, outcome_of, risk_decision
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from tradeguard.risk.model import OrderType, RiskCheck, RiskOrder, RiskRejected, Side

ORDER = RiskOrder("acct-1", "", "c-1", "BTC-USD", Side.BUY, OrderType.LIMIT, Decimal(2), Decimal(100))


def test_a_risk_refusal_is_denied_risk_with_the_values_that_failed() -> None:
    error = RiskRejected(RiskCheck.MAX_QUANTITY, ORDER, limit="1", actual="2")
    assert outcome_of(error, "FAILED_PRECONDITION") == pb.OUTCOME_DENIED_RISK
    assert risk_decision(error) == "RISK_MAX_QUANTITY account_id=acct-1 actual=2 limit=1 symbol=BTC-USD"
    kill = FailedPrecondition(
        "kill switch engaged", reason="KILL_SWITCH_ENGAGED", metadata={"scope": "global"}
    )
    assert outcome_of(kill, "FAILED_PRECONDITION") == pb.OUTCOME_DENIED_RISK
    assert risk_decision(kill) == "KILL_SWITCH_ENGAGED scope=global"


def test_other_failures_are_not_risk_decisions() -> None:
    other = FailedPrecondition("order not open", reason="ORDER_NOT_OPEN")
    assert (outcome_of(other, "FAILED_PRECONDITION"), risk_decision(other)) == (pb.OUTCOME_FAILED, "")
    assert outcome_of(InvalidArgument.field("f", "bad"), "INVALID_ARGUMENT") == pb.OUTCOME_INVALID
    assert outcome_of(None, "OK") == pb.OUTCOME_OK and risk_decision(None) == ""
    assert handler_outcome(Unauthenticated("x"), "UNAUTHENTICATED") == pb.OUTCOME_DENIED_AUTHENTICATION
    assert handler_outcome(PermissionDenied("x"), "PERMISSION_DENIED") == pb.OUTCOME_DENIED_PERMISSION
    assert handler_outcome(RuntimeError(), "INTERNAL") == pb.OUTCOME_FAILED


async def test_events_carry_the_clock_state_read_at_most_every_refresh() -> None:
    reads: list[int] = []

    def read_clock() -> tuple[int, int, int]:
        reads.append(1)
        return 1, 250, 16_000

    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never called: no event is appended here
    recorder = Recorder(channel, read_clock=read_clock)
    try:
        events = [
            recorder.event(time_us=1, method="/a.B/C", outcome=pb.OUTCOME_OK, status="OK", latency_us=5)
            for _ in range(100)
        ]
    finally:
        await channel.close(None)
    assert len(reads) == 1  # one adjtimex per CLOCK_REFRESH_S, not per event
    assert events[0].clock == pb.Clock(
        sync=pb.CLOCK_SYNC_SYNCHRONIZED, estimated_error_us=250, max_error_us=16_000
    )
    assert len({e.event_id for e in events}) == 100


async def test_texts_are_cut_and_details_kept() -> None:
    channel = grpc.aio.insecure_channel("127.0.0.1:9")
    recorder = Recorder(channel, read_clock=lambda: (0, 0, 0))
    try:
        event = recorder.event(
            time_us=1_500_000,
            method="m" * 1000,
            outcome=pb.OUTCOME_FAILED,
            status="INTERNAL",
            latency_us=2_000_001,
            details={"k": "v" * 1000},
            cause="why",
            risk="RISK_X",
        )
    finally:
        await channel.close(None)
    assert len(event.method) == MAX_TEXT and len(event.details["k"]) == MAX_TEXT
    assert event.details["cause"] == "why" and event.risk_decision == "RISK_X"
    assert event.time.ToMicroseconds() == 1_500_000 and event.latency.ToMicroseconds() == 2_000_001
