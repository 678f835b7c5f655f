"""The audit codec (services/audit/codec.py): model ↔ tradeguard.audit.v1 round trips (any event, any entry, any
int64 of microseconds), the bytes deterministic (map order does not matter) and equal to the proto's own
deterministic serialisation, the digest SHA-256 of the event's bytes, unknown enum values named, garbage refused;
the fast encoding (remembered prefix and event bytes, the event's field framed by hand) equals the reference in any
order of calls, after an event's details changed, and at any length."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.audit.codec import (
    decode_entry,
    encode_entry,
    encode_entry_reference,
    entry_to_proto,
    event_digest,
    event_from_proto,
    event_to_proto,
)
from services.audit.model import ClockSync, Entry, Event, Outcome
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.errors import InvalidArgument

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)

events = st.builds(
    Event,
    event_id=TEXT,
    time_us=INT64,
    outcome=st.sampled_from(Outcome),
    method=TEXT,
    principal=TEXT,
    account_id=TEXT,
    api_key_id=TEXT,
    caller=TEXT,
    source_ip=TEXT,
    resource=TEXT,
    action=TEXT,
    quota_decision=TEXT,
    risk_decision=TEXT,
    status_code=TEXT,
    request_id=TEXT,
    trace_id=TEXT,
    latency_us=INT64,
    clock_sync=st.sampled_from(ClockSync),
    clock_estimated_error_us=INT64,
    clock_max_error_us=INT64,
    details=st.dictionaries(TEXT, TEXT, max_size=5),
)
entries = st.builds(Entry, record_time_us=INT64, recorder=TEXT, event=events)


@given(entries)
def test_entry_round_trips(entry: Entry) -> None:
    data = encode_entry(entry)
    assert decode_entry(data) == entry
    assert encode_entry(decode_entry(data)) == data
    assert data == entry_to_proto(entry).SerializeToString(deterministic=True)


@given(events)
def test_event_round_trips_through_the_proto(event: Event) -> None:
    message = event_to_proto(event)
    assert event_from_proto(pb.Event.FromString(message.SerializeToString())) == event


@given(events)
def test_digest_is_sha256_of_the_events_deterministic_bytes(event: Event) -> None:
    expected = hashlib.sha256(event_to_proto(event).SerializeToString(deterministic=True)).digest()
    assert event_digest(event) == expected
    assert len(event_digest(event)) == 32


def test_bytes_do_not_depend_on_the_order_of_details() -> None:
    base = Event(event_id="e1", time_us=1_700_000_000_123_456, outcome=Outcome.OK)
    one = Event(
        event_id="e1", time_us=base.time_us, outcome=Outcome.OK, details={"a": "1", "b": "2", "c": "3"}
    )
    two = Event(
        event_id="e1", time_us=base.time_us, outcome=Outcome.OK, details={"c": "3", "a": "1", "b": "2"}
    )
    assert encode_entry(Entry(5, "r", one)) == encode_entry(Entry(5, "r", two))
    assert event_digest(one) == event_digest(two) != event_digest(base)


def test_times_are_microseconds_on_the_wire() -> None:
    event = Event(event_id="e1", time_us=1_700_000_000_123_456, outcome=Outcome.OK, latency_us=-1_500_001)
    message = event_to_proto(event)
    assert (message.time.seconds, message.time.nanos) == (1_700_000_000, 123_456_000)
    assert (message.latency.seconds, message.latency.nanos) == (-1, -500_001_000)
    before_epoch = event_to_proto(Event(event_id="e", time_us=-1, outcome=Outcome.OK))
    assert (before_epoch.time.seconds, before_epoch.time.nanos) == (-1, 999_999_000)
    assert not message.HasField("clock")
    message.time.nanos = 123_456_789  # sub-microsecond precision from a caller is dropped
    assert event_from_proto(message).time_us == 1_700_000_000_123_456


def test_a_missing_time_is_zero_and_the_clock_is_read() -> None:
    message = pb.Event(event_id="e", outcome=pb.OUTCOME_OK)
    message.clock.sync = pb.CLOCK_SYNC_UNSYNCHRONIZED
    message.clock.estimated_error_us = 7
    message.clock.max_error_us = 16_000_000
    event = event_from_proto(message)
    assert event.time_us == 0
    assert (event.clock_sync, event.clock_estimated_error_us, event.clock_max_error_us) == (
        ClockSync.UNSYNCHRONIZED,
        7,
        16_000_000,
    )


def test_unknown_enum_values_are_named() -> None:
    message = pb.Event.FromString(pb.Event(event_id="e").SerializeToString() + b"\x70\x63\x1a\x02\x08\x09")
    with pytest.raises(InvalidArgument) as caught:
        event_from_proto(message, "events[3]")
    assert [v.field for v in caught.value.violations] == ["events[3].outcome", "events[3].clock.sync"]


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05abc"])
def test_garbage_is_not_an_entry(data: bytes) -> None:
    with pytest.raises(ValueError, match="not an audit entry"):
        decode_entry(data)


# --- the fast encoding (the remembered prefix and event bytes) equals the reference --------------------------------


def _reference_digest(event: Event) -> bytes:
    return hashlib.sha256(event_to_proto(event).SerializeToString(deterministic=True)).digest()


@given(st.lists(entries, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_encoding_equals_the_reference_whatever_was_encoded_before(
    batch: list[Entry], rnd: random.Random
) -> None:
    shared = [Entry(batch[0].record_time_us, batch[0].recorder, e.event) for e in batch]  # one call's prefix
    for entry in rnd.sample(batch + shared, len(batch) * 2):
        assert encode_entry(entry) == encode_entry_reference(entry)
        assert event_digest(entry.event) == _reference_digest(entry.event)
        other = rnd.choice(batch).event
        assert event_digest(other) == _reference_digest(other)
    for entry in batch:
        assert event_digest(entry.event) == _reference_digest(entry.event)


def test_details_changed_after_encoding_are_encoded_anew() -> None:
    details = {"a": "1"}
    event = Event(event_id="e1", time_us=1_700_000_000_000_000, outcome=Outcome.OK, details=details)
    entry = Entry(5, "r", event)
    before = encode_entry(entry)
    details["a"] = "2"
    assert encode_entry(entry) == encode_entry_reference(entry) != before
    assert event_digest(event) == _reference_digest(event)
    details.clear()
    assert event_digest(event) == _reference_digest(event)
    assert encode_entry(entry) == encode_entry_reference(entry)


@pytest.mark.parametrize("size", [0, 100, 127, 128, 16_383, 16_384, 3_000_000])
def test_events_of_any_length_are_framed_as_the_proto_frames_them(size: int) -> None:
    event = Event(event_id="e1", time_us=1_700_000_000_000_000, outcome=Outcome.OK, resource="r" * size)
    entry = Entry(1_700_000_000_000_001, "spiffe://tradeguard.local/ns/default/sa/trading", event)
    assert encode_entry(entry) == encode_entry_reference(entry)
    assert decode_entry(encode_entry(entry)) == entry
