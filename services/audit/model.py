"""The audit service's types. Imports nothing else of the service.

An `Event` is what a recorder sends (who, what, when, outcome); an `Entry` is an event as recorded (masked, with
the audit service's record time and the recorder's SPIFFE ID). An entry's BYTES (`codec.encode_entry`: the
deterministic protobuf serialisation of `tradeguard.audit.v1.Entry`) are what the Merkle tree hashes and what the
store keeps; everything else a store keeps about an entry (the columns a query searches) is derived from them and
checked against them by `tradeguard audit verify`.

The log: entries in order, sequence numbers 0, 1, 2, … without gaps; an RFC 6962 Merkle tree over their bytes
(tradeguard.audit.tlog: leaf hash SHA-256(0x00 ‖ bytes), node hash SHA-256(0x01 ‖ left ‖ right)), whose complete
subtrees' hashes the store keeps (`Node`), so that a proof costs O(log n) reads; signed tree heads (`Checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from tradeguard.audit.outcome import Outcome
from tradeguard.clock import ClockSync

__all__ = [
    "EVENT_ID_PATTERN",
    "MAX_BATCH",
    "MAX_PAGE",
    "TEXT_FIELDS",
    "Appended",
    "Checkpoint",
    "ClockSync",
    "Entry",
    "Event",
    "Node",
    "Outcome",
    "Pending",
    "Query",
    "StoredEntry",
]

EVENT_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_BATCH: Final = 1000  # events per AppendBatch
MAX_PAGE: Final = 1000  # entries per page (Query, GetEntries)
# an Event's free-text fields (validated, masked and bounded alike)
TEXT_FIELDS: Final = (
    "method",
    "principal",
    "account_id",
    "api_key_id",
    "caller",
    "source_ip",
    "resource",
    "action",
    "quota_decision",
    "risk_decision",
    "status_code",
    "request_id",
    "trace_id",
)
DEFAULT_PAGE: Final = 100


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened, as a recorder reports it (fields as in tradeguard.audit.v1.Event)."""

    event_id: str
    time_us: int
    outcome: Outcome
    method: str = ""
    principal: str = ""
    account_id: str = ""
    api_key_id: str = ""
    caller: str = ""
    source_ip: str = ""
    resource: str = ""
    action: str = ""
    quota_decision: str = ""
    risk_decision: str = ""
    status_code: str = ""
    request_id: str = ""
    trace_id: str = ""
    latency_us: int = 0
    clock_sync: ClockSync = ClockSync.UNSPECIFIED
    clock_estimated_error_us: int = 0
    clock_max_error_us: int = 0
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Entry:
    """An event as recorded (masked): what the leaf's bytes encode."""

    record_time_us: int
    recorder: str  # the appending workload's SPIFFE ID
    event: Event


@dataclass(frozen=True, slots=True)
class Pending:
    """An entry on its way into the log: its bytes (as they will be hashed and stored), their leaf hash, and the
    digest of its event alone (SHA-256 of the event's deterministic bytes), which makes a retried append
    idempotent: the same (recorder, event id) with the same event digest is the entry already appended; with
    another digest it is a conflict."""

    entry: Entry
    entry_bytes: bytes
    leaf_hash: bytes
    event_digest: bytes


@dataclass(frozen=True, slots=True)
class Appended:
    """Where a durable entry is. `created` False: its (recorder, event id) was appended before; this is that
    entry."""

    sequence: int
    leaf_hash: bytes
    created: bool = True


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as the store returns it: its position and its bytes and leaf hash as stored (decoded by
    services/audit/codec.py where needed; the store's query columns are never returned: they are derived)."""

    sequence: int
    entry_bytes: bytes
    leaf_hash: bytes


@dataclass(frozen=True, slots=True)
class Node:
    """The hash of a complete subtree: level L, index i covers leaves [i * 2^L, (i + 1) * 2^L)."""

    level: int
    index: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed tree head: the C2SP signed note text for `tree_size` leaves with `root_hash`."""

    tree_size: int
    root_hash: bytes
    note: str
    time_us: int


@dataclass(frozen=True, slots=True)
class Query:
    """A forensic search: every set field must match; times in µs, [start, end)."""

    principal: str = ""
    account_id: str = ""
    api_key_id: str = ""
    method: str = ""
    outcome: Outcome = Outcome.UNSPECIFIED
    start_us: int | None = None
    end_us: int | None = None
