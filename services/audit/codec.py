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

Speed (the append path runs these per event): `encode_entry` builds the `Event` message once and serialises it
alone; the entry's bytes are the serialised (record time, recorder) prefix — the same for every entry of one
append call, remembered — followed by field 3 (the event) written by hand: a message's deterministic encoding is
its fields' encodings in field-number order, so this is byte for byte `entry_to_proto(entry).SerializeToString(
deterministic=True)` (`encode_entry_reference`, which the tests compare with it). The event's bytes of the last
entry encoded are remembered with the event (a strong reference: frozen, so they cannot change), and
`event_digest` of that same event object hashes them instead of encoding it again.
"""

from __future__ import annotations

import hashlib
from typing import Final

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from services.audit.model import ClockSync, Entry, Event, Outcome
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.errors import FieldViolation, InvalidArgument

__all__ = [
    "decode_entry",
    "encode_entry",
    "encode_entry_reference",
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


def _duration_us(d: duration_pb2.Duration) -> int:
    nanos = d.nanos
    micros = abs(nanos) // 1000 * (-1 if nanos < 0 else 1)
    return d.seconds * _US + micros


_OUTCOMES: Final = {int(o): o for o in Outcome}
_SYNCS: Final = {int(s): s for s in ClockSync}


def event_from_proto(message: pb.Event, field: str = "event") -> Event:
    """The model of a received event (see the module for unknown enum values)."""
    clock = message.clock  # an unset message reads as its defaults: no HasField needed
    outcome = _OUTCOMES.get(message.outcome)
    sync = _SYNCS.get(clock.sync)
    if outcome is None or sync is None:
        violations = []
        if outcome is None:
            violations.append(FieldViolation(f"{field}.outcome", f"unknown outcome {message.outcome}"))
        if sync is None:
            violations.append(FieldViolation(f"{field}.clock.sync", f"unknown clock sync {clock.sync}"))
        raise InvalidArgument(violations)
    time = message.time
    latency = message.latency
    details = message.details
    return Event(
        event_id=message.event_id,
        time_us=time.seconds * _US + time.nanos // 1000,
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
        latency_us=_duration_us(latency) if latency.seconds or latency.nanos else 0,
        clock_sync=sync,
        clock_estimated_error_us=clock.estimated_error_us,
        clock_max_error_us=clock.max_error_us,
        details=dict(details) if details else {},
    )


def event_to_proto(event: Event) -> pb.Event:
    """The event as a message, in the canonical form (see the module)."""
    message = pb.Event(
        event_id=event.event_id,
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
    )
    seconds, micros = divmod(event.time_us, _US)
    time = message.time  # set field by field: cheaper than a Timestamp made and copied; always present
    time.seconds = seconds
    time.nanos = micros * 1000
    if event.details:
        message.details.update(event.details)
    if event.clock_sync or event.clock_estimated_error_us or event.clock_max_error_us:
        clock = message.clock
        clock.sync = int(event.clock_sync)  # type: ignore[assignment] # the enum's number
        clock.estimated_error_us = event.clock_estimated_error_us
        clock.max_error_us = event.clock_max_error_us
    if event.latency_us:
        whole, micros = divmod(abs(event.latency_us), _US)
        sign = -1 if event.latency_us < 0 else 1
        latency = message.latency
        latency.seconds = sign * whole
        latency.nanos = sign * micros * 1000
    return message


def entry_to_proto(entry: Entry) -> pb.Entry:
    """The entry as a message, in the canonical form."""
    return pb.Entry(
        record_time=_timestamp(entry.record_time_us),
        recorder=entry.recorder,
        event=event_to_proto(entry.event),
    )


def encode_entry_reference(entry: Entry) -> bytes:
    """`encode_entry` the obvious way (the whole message built and serialised): what the tests compare with."""
    return entry_to_proto(entry).SerializeToString(deterministic=True)


_EVENT_TAG: Final = b"\x1a"  # Entry.event: field 3, length-delimited
_ONE_BYTE: Final = tuple(bytes((n,)) for n in range(128))


def _varint(n: int) -> bytes:
    if n < 128:
        return _ONE_BYTE[n]
    out = bytearray()
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _Memo:
    """The last (record time, recorder) prefix and the last event encoded, with their bytes (one slot each:
    replaced as a whole tuple, so a reader never pairs one event with another's bytes). The event's details are
    a mapping its maker could still change: their items are kept too and must be equal for the bytes to be."""

    prefix: tuple[int, str, bytes] = (0, "", b"")
    event: tuple[Event | None, tuple[tuple[str, str], ...], bytes] = (None, (), b"")


def _event_bytes(event: Event) -> bytes:
    memo_event, details, data = _Memo.event
    items = tuple(event.details.items())
    if memo_event is event and details == items:
        return data
    data = event_to_proto(event).SerializeToString(deterministic=True)
    _Memo.event = (event, items, data)
    return data


def encode_entry(entry: Entry) -> bytes:
    """The entry's bytes as the log hashes and keeps them (deterministic serialisation; see the module)."""
    record_us, recorder, prefix = _Memo.prefix
    if record_us != entry.record_time_us or recorder != entry.recorder or not prefix:
        message = pb.Entry(record_time=_timestamp(entry.record_time_us), recorder=entry.recorder)
        prefix = message.SerializeToString(deterministic=True)
        _Memo.prefix = (entry.record_time_us, entry.recorder, prefix)
    data = _event_bytes(entry.event)
    return b"".join((prefix, _EVENT_TAG, _varint(len(data)), data))


def event_digest(event: Event) -> bytes:
    """SHA-256 of the event's deterministic bytes."""
    return hashlib.sha256(_event_bytes(event)).digest()


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
