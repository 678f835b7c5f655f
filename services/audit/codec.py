"""The audit log's bytes: `tradeguard.audit.v1` messages ↔ the model (services/audit/model.py).

- `encode_entry(entry)`: the entry as `tradeguard.audit.v1.Entry`, serialised with
  `SerializeToString(deterministic=True)` (map keys sorted): the bytes the Merkle leaf hashes and the store keeps.
  The encoding is a function of the model alone: `decode_entry(encode_entry(e)) == e` and, for bytes made by
  `encode_entry`, `encode_entry(decode_entry(b)) == b`.
- `event_digest(event)`: SHA-256 of the `Event` message's deterministic bytes (what makes a retry idempotent).
- `event_from_proto(pb, field)`: a received event; an enum value the model does not know is `InvalidArgument`
  naming `<field>.outcome` / `<field>.clock.sync` (the core validates everything else).
- `entry_to_proto(entry)`, `decode_entry(data)` (`ValueError` for bytes that are not an entry).

Canonical form (so that equal models give equal bytes): `time`, `record_time` and `event` are always set;
`clock` is set only when one of its fields is not the default, `latency` only when it is not zero; times are
microseconds (a received timestamp's sub-microsecond nanos are dropped), written as (seconds, nanos) with nanos in
[0, 1e9) for timestamps and with the sign of the seconds for durations, without the range checks of protobuf's
helpers (any int64 of microseconds round-trips; the core refuses absurd times).
"""

from __future__ import annotations

import hashlib

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from services.audit.model import ClockSync, Entry, Event, Outcome
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.errors import FieldViolation, InvalidArgument

__all__ = [
    "decode_entry",
    "encode_entry",
    "entry_to_proto",
    "event_digest",
    "event_from_proto",
    "event_to_proto",
]

_US = 1_000_000


def _timestamp(time_us: int) -> timestamp_pb2.Timestamp:
    seconds, micros = divmod(time_us, _US)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)


def _timestamp_us(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * _US + ts.nanos // 1000


def _duration(us: int) -> duration_pb2.Duration:
    whole, micros = divmod(abs(us), _US)
    sign = -1 if us < 0 else 1
    return duration_pb2.Duration(seconds=sign * whole, nanos=sign * micros * 1000)


def _duration_us(d: duration_pb2.Duration) -> int:
    nanos = d.nanos
    micros = abs(nanos) // 1000 * (-1 if nanos < 0 else 1)
    return d.seconds * _US + micros


def event_from_proto(message: pb.Event, field: str = "event") -> Event:
    """The model of a received event (see the module for unknown enum values)."""
    violations = []
    try:
        outcome = Outcome(message.outcome)
    except ValueError:
        violations.append(FieldViolation(f"{field}.outcome", f"unknown outcome {message.outcome}"))
        outcome = Outcome.UNSPECIFIED
    try:
        sync = ClockSync(message.clock.sync)
    except ValueError:
        violations.append(FieldViolation(f"{field}.clock.sync", f"unknown clock sync {message.clock.sync}"))
        sync = ClockSync.UNSPECIFIED
    if violations:
        raise InvalidArgument(violations)
    return Event(
        event_id=message.event_id,
        time_us=_timestamp_us(message.time) if message.HasField("time") else 0,
        outcome=outcome,
        method=message.method,
        principal=message.principal,
        account_id=message.account_id,
        api_key_id=message.api_key_id,
        caller=message.caller,
        source_ip=message.source_ip,
        resource=message.resource,
        action=message.action,
        quota_decision=message.quota_decision,
        risk_decision=message.risk_decision,
        status_code=message.status_code,
        request_id=message.request_id,
        trace_id=message.trace_id,
        latency_us=_duration_us(message.latency) if message.HasField("latency") else 0,
        clock_sync=sync,
        clock_estimated_error_us=message.clock.estimated_error_us,
        clock_max_error_us=message.clock.max_error_us,
        details=dict(message.details),
    )


def event_to_proto(event: Event) -> pb.Event:
    """The event as a message, in the canonical form (see the module)."""
    message = pb.Event(
        event_id=event.event_id,
        time=_timestamp(event.time_us),
        principal=event.principal,
        account_id=event.account_id,
        api_key_id=event.api_key_id,
        caller=event.caller,
        source_ip=event.source_ip,
        method=event.method,
        resource=event.resource,
        action=event.action,
        quota_decision=event.quota_decision,
        risk_decision=event.risk_decision,
        outcome=int(event.outcome),  # type: ignore[arg-type] # the enum's number
        status_code=event.status_code,
        request_id=event.request_id,
        trace_id=event.trace_id,
        details=dict(event.details),
    )
    if event.clock_sync or event.clock_estimated_error_us or event.clock_max_error_us:
        message.clock.sync = int(event.clock_sync)  # type: ignore[assignment] # the enum's number
        message.clock.estimated_error_us = event.clock_estimated_error_us
        message.clock.max_error_us = event.clock_max_error_us
    if event.latency_us:
        message.latency.CopyFrom(_duration(event.latency_us))
    return message


def entry_to_proto(entry: Entry) -> pb.Entry:
    """The entry as a message, in the canonical form."""
    return pb.Entry(
        record_time=_timestamp(entry.record_time_us),
        recorder=entry.recorder,
        event=event_to_proto(entry.event),
    )


def encode_entry(entry: Entry) -> bytes:
    """The entry's bytes as the log hashes and keeps them (deterministic serialisation)."""
    return entry_to_proto(entry).SerializeToString(deterministic=True)


def event_digest(event: Event) -> bytes:
    """SHA-256 of the event's deterministic bytes."""
    return hashlib.sha256(event_to_proto(event).SerializeToString(deterministic=True)).digest()


def decode_entry(data: bytes) -> Entry:
    """The entry encoded in `data`; `ValueError` if it is not one."""
    message = pb.Entry()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise ValueError(f"not an audit entry: {error}") from None
    try:
        event = event_from_proto(message.event)
    except InvalidArgument as error:
        raise ValueError(f"not an audit entry: {error}") from None
    return Entry(record_time_us=_timestamp_us(message.record_time), recorder=message.recorder, event=event)
