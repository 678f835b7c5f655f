"""Where the audit log lives: the contract every backend keeps (SQLite, the embedded default; PostgreSQL).

Append-only. The tables are written only by INSERT; the database itself refuses UPDATE and DELETE of entries,
nodes and checkpoints (triggers; on PostgreSQL also the privileges of a separate writer role that may only
SELECT and INSERT), so an administrator who alters the log has to defeat the database first — and then
`tradeguard audit verify` still finds the first altered, missing or reordered entry from the Merkle tree.

- `append(batch)`: ONE transaction, committed durably (SQLite WAL with synchronous=FULL; PostgreSQL COMMIT)
  before it returns; the entries get the next sequence numbers in order (no gaps); the Merkle tree's new complete
  subtree hashes (services/audit/tree.py `new_nodes`) are inserted in the same transaction. Per item: `Appended`;
  an item whose (recorder, event id) is already in the log (before this batch or earlier in it) is not appended
  again: with the same event digest it answers the first entry (`created=False`); with another digest it is an
  `EventIdConflict` in its place (nothing of it written). The batch as a whole failing raises (nothing of it is
  committed). Callers never run two appends at once (the service's one batcher); a store may rely on it.
- `size()`: how many entries are committed.
- `nodes(keys)`: the hashes of complete subtrees (level, index), in order; a missing one raises `KeyError`.
- `entries(start, count)`: the entries with sequence numbers start .. start+count-1 that exist, in order.
- `rows(start, count)`: the same entries as stored, every column (ENTRY_COLUMNS' order): what `python -m
  services.audit verify-store` checks against the entry bytes (the query columns are an index, not the record).
- `query(query, after, limit)`: entries matching `query` with sequence > after, ascending, at most `limit`.
- `add_checkpoint`, `latest_checkpoint`, `checkpoints(after_size, limit)` (ascending by tree size).
- `close()`.

**Retention** (services/audit/retention.py archives, then prunes, a PREFIX of the log: entries 0 .. P-1):
- `pruned()`: P, how many leading entries were archived and deleted (the greatest archived `last_sequence` + 1;
  0 when none). `size()` counts them: it is the tree's size, max(stored sequence, P - 1) + 1.
- `expired(before_us, below, limit)`: the stored entries from the first one stored, in sequence order, while
  their RECORD time is before `before_us` and their sequence below `below`, at most `limit`: the next segment to
  archive (the first entry not old enough ends it, so what is pruned stays a prefix).
- `prune(archive)`: ONE transaction: the `archives` row (its segment file already durable) is inserted, then the
  entries `archive.first_sequence .. archive.last_sequence` are deleted; all of them must be deleted, or nothing
  is (raises, rolled back). The database itself refuses (triggers, whatever the caller): an `archives` row that
  does not start where the last one ended; the delete of an entry that no `archives` row covers or whose record
  time is not older than the database's clock minus the LONGEST retention period ever recorded. UPDATE of
  entries is refused always; nodes and checkpoints are never deleted (the tree, its proofs and the signed
  checkpoints stay valid after pruning).
- `archives()`: the `archives` rows, ascending.
- `retention_days()`: the longest retention period ever recorded (None before any). `record_retention(days,
  at_us)`: ONE transaction: inserts `days` when it is longer than that maximum, and returns the maximum after
  (the `retention` table is append-only: a shorter period inserted by anyone changes nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from services.audit import tree
from services.audit.model import Appended, Checkpoint, Pending, Query, StoredEntry
from tradeguard.errors import AlreadyExists

__all__ = [
    "ENTRY_COLUMNS",
    "MAX_RETENTION_DAYS",
    "US_PER_DAY",
    "AppendPlan",
    "Archive",
    "AuditStore",
    "EventIdConflict",
    "Existing",
    "archive_row",
    "check_deleted",
    "check_page",
    "check_retention",
    "entry_row",
    "plan_append",
    "query_conditions",
    "recorded_before",
]


class EventIdConflict(AlreadyExists):
    """An event id this recorder already used for a different event."""

    reason = "EVENT_ID_CONFLICT"


US_PER_DAY: Final = 86_400_000_000
MAX_RETENTION_DAYS: Final = 36_500  # the `retention` table's CHECK, and the setting's range


@dataclass(frozen=True, slots=True)
class Archive:
    """An archived segment of the log: entries `first_sequence` .. `last_sequence` (inclusive), written to the
    file `file_name` (in the archive directory) whose SHA-256 is `sha256`, recorded at `archived_at_us`."""

    first_sequence: int
    last_sequence: int
    sha256: bytes
    file_name: str
    archived_at_us: int


class AuditStore(Protocol):
    async def append(self, batch: Sequence[Pending]) -> list[Appended | EventIdConflict]: ...

    async def size(self) -> int: ...

    async def nodes(self, keys: Sequence[tuple[int, int]]) -> list[bytes]: ...

    async def entries(self, start: int, count: int) -> list[StoredEntry]: ...

    async def rows(self, start: int, count: int) -> list[tuple[Any, ...]]: ...

    async def query(self, query: Query, after: int, limit: int) -> list[StoredEntry]: ...

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    async def latest_checkpoint(self) -> Checkpoint | None: ...

    async def checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]: ...

    async def pruned(self) -> int: ...

    async def expired(self, before_us: int, below: int, limit: int) -> list[StoredEntry]: ...

    async def prune(self, archive: Archive) -> None: ...

    async def archives(self) -> list[Archive]: ...

    async def retention_days(self) -> int | None: ...

    async def record_retention(self, days: int, at_us: int) -> int: ...

    async def close(self) -> None: ...


def archive_row(archive: Archive) -> tuple[int, int, bytes, str, int]:
    """The `archives` row of a segment record (the columns of `insert_archive`), once it is checked well-formed
    (ValueError otherwise, before anything is written)."""
    if not 0 <= archive.first_sequence <= archive.last_sequence:
        raise ValueError(f"invalid archived range {archive.first_sequence} .. {archive.last_sequence}")
    if len(archive.sha256) != 32 or not archive.file_name:
        raise ValueError("an archive needs its file's name and SHA-256")
    return (
        archive.first_sequence,
        archive.last_sequence,
        archive.sha256,
        archive.file_name,
        archive.archived_at_us,
    )


def check_retention(days: int) -> None:
    if not 1 <= days <= MAX_RETENTION_DAYS:
        raise ValueError(f"a retention period is 1 to {MAX_RETENTION_DAYS} days, not {days}")


# --- what an append writes, and how a query reads (pure; both stores) ------------------------------------------
ENTRY_COLUMNS: Final = (
    "sequence",
    "recorder",
    "event_id",
    "event_digest",
    "entry_bytes",
    "leaf_hash",
    "principal",
    "account_id",
    "api_key_id",
    "method",
    "outcome",
    "event_time_us",
    "record_time_us",
)


@dataclass(frozen=True, slots=True)
class Existing:
    """An entry already in the log, as an append's idempotency check reads it."""

    sequence: int
    leaf_hash: bytes
    event_digest: bytes


@dataclass(frozen=True, slots=True)
class AppendPlan:
    results: list[Appended | EventIdConflict]
    rows: list[tuple[int, Pending]]  # (sequence, pending) to insert, in order
    nodes: list[tuple[int, int, bytes]]  # (level, index, hash) to insert, in order of creation
    size: int  # after the append
    frontier: dict[tuple[int, int], bytes]  # the right edge after the append


def entry_row(sequence: int, pending: Pending) -> tuple[Any, ...]:
    """The `entries` row of `pending` at `sequence` (ENTRY_COLUMNS' order)."""
    entry, event = pending.entry, pending.entry.event
    return (
        sequence,
        entry.recorder,
        event.event_id,
        pending.event_digest,
        pending.entry_bytes,
        pending.leaf_hash,
        event.principal,
        event.account_id,
        event.api_key_id,
        event.method,
        int(event.outcome),
        event.time_us,
        entry.record_time_us,
    )


def plan_append(
    batch: Sequence[Pending],
    size: int,
    frontier: Mapping[tuple[int, int], bytes],
    existing: Mapping[tuple[str, str], Existing],
) -> AppendPlan:
    """What appending `batch` to a log of `size` entries writes, given the right edge of its tree and the
    entries already appended under the batch's (recorder, event id)s (see the contract)."""
    # (sequence, leaf hash, event digest) by (recorder, event id): before the batch, and as it goes
    seen = {key: (e.sequence, e.leaf_hash, e.event_digest) for key, e in existing.items()}
    results: list[Appended | EventIdConflict] = []
    rows: list[tuple[int, Pending]] = []
    sequence = size
    for pending in batch:
        entry = pending.entry
        key = (entry.recorder, entry.event.event_id)
        before = seen.get(key)
        if before is None:
            seen[key] = (sequence, pending.leaf_hash, pending.event_digest)
            rows.append((sequence, pending))
            results.append(Appended(sequence, pending.leaf_hash))
            sequence += 1
        elif before[2] == pending.event_digest:
            results.append(Appended(before[0], before[1], created=False))
        else:
            results.append(
                EventIdConflict(
                    f"event id {key[1]!r} was already appended by this recorder for another event",
                    metadata={"event_id": key[1]},
                )
            )
    nodes, waiting = tree.grow(
        size, [p.leaf_hash for _, p in rows], lambda level, index: frontier[(level, index)]
    )
    # the new right edge: a node the batch completed (it covers a new leaf) waits at its level; the others are
    # the old edge's
    edge = {
        (level, index): waiting[level] if (index + 1) << level > size else frontier[(level, index)]
        for level, index in tree.subtree_keys(0, sequence)
    }
    return AppendPlan(results, rows, nodes, sequence, edge)


def query_conditions(query: Query, placeholder: str) -> tuple[list[str], list[object]]:
    """The WHERE conditions (constant text) and their parameters for the set fields of `query`."""
    conditions: list[str] = []
    params: list[object] = []
    for name in ("principal", "account_id", "api_key_id", "method"):
        value = getattr(query, name)
        if value:
            conditions.append(f"{name} = {placeholder}")
            params.append(value)
    if query.outcome:
        conditions.append(f"outcome = {placeholder}")
        params.append(int(query.outcome))
    if query.start_us is not None:
        conditions.append(f"event_time_us >= {placeholder}")
        params.append(query.start_us)
    if query.end_us is not None:
        conditions.append(f"event_time_us < {placeholder}")
        params.append(query.end_us)
    return conditions, params


def check_page(after: int, limit: int) -> None:
    if limit < 0:
        raise ValueError(f"limit must not be negative, not {limit}")
    if after < -1:
        raise ValueError(f"after must be -1 (from the start) or a sequence number, not {after}")


def recorded_before(rows: Sequence[Sequence[Any]], before_us: int) -> list[StoredEntry]:
    """`expired`'s answer: the leading rows (sequence, bytes, leaf hash, record time) recorded before `before_us`."""
    out: list[StoredEntry] = []
    for sequence, data, leaf, record_us in rows:
        if int(record_us) >= before_us:
            break
        out.append(StoredEntry(int(sequence), bytes(data), bytes(leaf)))
    return out


def check_deleted(deleted: int, archive: Archive) -> None:
    expected = archive.last_sequence - archive.first_sequence + 1
    if deleted != expected:  # raised inside the transaction: rolled back, archives row included
        raise RuntimeError(
            f"pruning entries {archive.first_sequence} .. {archive.last_sequence} deleted {deleted} of "
            f"{expected}: nothing pruned (the log has a hole there)"
        )
