"""The stored columns of an entry against its bytes: what `python -m services.audit verify-store` adds to the Merkle
tree's check.

The tree proves the entries' bytes; the columns beside them (recorder, event id, digest, leaf hash, and the query
columns principal, account, API key, method, outcome, event and record times) are an index the service writes from
the same entry. Someone who gets past the database's refusals could change a column and leave the bytes alone —
so that `Query` by principal no longer finds an event, say — and the tree would still verify. `column_problems`
decodes the bytes, recomputes the row the service would have written (`store.entry_row`) and names every column
that differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from services.audit import codec
from services.audit.model import Pending
from services.audit.store import ENTRY_COLUMNS, entry_row
from tradeguard.audit import tlog

__all__ = ["column_problems"]

_ENTRY_BYTES: Final = ENTRY_COLUMNS.index("entry_bytes")


def _shown(value: Any) -> str:
    return bytes(value).hex() if isinstance(value, bytes | bytearray | memoryview) else repr(value)


def column_problems(row: Sequence[Any]) -> list[str]:
    """What is wrong with one stored row (ENTRY_COLUMNS' order): its bytes not an entry, or each column that the
    bytes contradict; empty when the row is the one the service would have written."""
    sequence = int(row[0])
    data = bytes(row[_ENTRY_BYTES])
    try:
        entry = codec.decode_entry(data)
    except ValueError as error:
        return [f"entry {sequence}: its bytes are not an entry ({error})"]
    expected = entry_row(
        sequence, Pending(entry, data, tlog.leaf_hash(data), codec.event_digest(entry.event))
    )
    problems = []
    for name, stored, wanted in zip(ENTRY_COLUMNS, row, expected, strict=True):
        same = bytes(stored) == wanted if isinstance(wanted, bytes) else stored == wanted
        if not same:
            problems.append(
                f"entry {sequence}: column {name} is {_shown(stored)}, its bytes say {_shown(wanted)}"
            )
    return problems
