"""`decode`: an audit `StoredEntry` as the detectors see it (times to the microsecond, the outcome by name, the
details; an outcome this version does not know is UNSPECIFIED, never an error). The follower itself is exercised
against the real audit service in test_service.py (pages, the Tail waking it, a restart)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from services.monitor.model import Outcome
from services.monitor.tail import decode
from tradeguard.audit.v1 import audit_pb2 as pb


def test_decode() -> None:
    stored = pb.StoredEntry(
        sequence=42,
        entry=pb.Entry(
            record_time=Timestamp(seconds=1_800_000_001, nanos=250_000),
            recorder="spiffe://t/svc/trading",
            event=pb.Event(
                event_id="e1",
                time=Timestamp(seconds=1_800_000_000, nanos=123_456_000),
                principal="usr_1",
                account_id="acct-1",
                api_key_id="tgk_1",
                source_ip="192.0.2.1",
                method="/tradeguard.trading.v1.TradingService/PlaceOrder",
                action="orders:write",
                outcome=pb.OUTCOME_DENIED_AUTHENTICATION,
                status_code="UNAUTHENTICATED",
                details={"cause": "bad signature"},
            ),
        ),
    )
    event = decode(stored)
    assert (event.sequence, event.time_us, event.record_time_us) == (
        42,
        1_800_000_000_123_456,
        1_800_000_001_000_250,
    )
    assert (event.principal, event.account_id, event.api_key_id, event.source_ip) == (
        "usr_1",
        "acct-1",
        "tgk_1",
        "192.0.2.1",
    )
    assert event.outcome is Outcome.DENIED_AUTHENTICATION and event.details == {"cause": "bad signature"}
    assert event.recorder == "spiffe://t/svc/trading" and event.status_code == "UNAUTHENTICATED"
    stored.entry.event.outcome = pb.Outcome.ValueType(99)
    assert decode(stored).outcome is Outcome.UNSPECIFIED
