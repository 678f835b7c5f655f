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
- `query(query, after, limit)`: entries matching `query` with sequence > after, ascending, at most `limit`.
- `add_checkpoint`, `latest_checkpoint`, `checkpoints(after_size, limit)` (ascending by tree size).
- `close()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.audit.model import Appended, Checkpoint, Pending, Query, StoredEntry
from tradeguard.errors import AlreadyExists

__all__ = ["AuditStore", "EventIdConflict"]


class EventIdConflict(AlreadyExists):
    """An event id this recorder already used for a different event."""

    reason = "EVENT_ID_CONFLICT"


class AuditStore(Protocol):
    async def append(self, batch: Sequence[Pending]) -> list[Appended | EventIdConflict]: ...

    async def size(self) -> int: ...

    async def nodes(self, keys: Sequence[tuple[int, int]]) -> list[bytes]: ...

    async def entries(self, start: int, count: int) -> list[StoredEntry]: ...

    async def query(self, query: Query, after: int, limit: int) -> list[StoredEntry]: ...

    async def add_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    async def latest_checkpoint(self) -> Checkpoint | None: ...

    async def checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]: ...

    async def close(self) -> None: ...
