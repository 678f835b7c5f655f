"""The audit log's archive segments: the entries retention removed from the database, kept as files that
`tradeguard audit verify` checks (written by services/audit/retention.py, read here; pure: no grpc, protobuf or
database).

A segment holds the consecutive entries `first` .. `last` of the log, one file `segment_name(first, last)`
(`segment-<first, 20 digits>-<last, 20 digits>.jsonl`), JSON lines:

- line 1, the header: `{"format": FORMAT, "first_sequence", "last_sequence", "count", "range_before",
  "range_after", "checkpoint": {"tree_size", "root_hash", "note"}, "archived_at_us"}`. `range_before` is the
  compact range of the tree's first `first` leaves (the hashes of the complete subtrees that the binary
  decomposition of `first` cuts them into, largest first, hex), `range_after` the one of the first `last + 1`
  leaves (so segments chain: one's `range_after` is the next one's `range_before`, and the first starts from
  the empty range); `checkpoint` is the latest signed checkpoint (C2SP note text) when it was archived, which
  covers the segment (its size is above `last`). Hashes in lower-case hex.
- then one line per entry, in order: `{"sequence", "leaf_hash": hex, "entry_bytes": base64}` — the exact bytes
  the Merkle tree hashed.

`check_segment` checks what a segment alone can show (consecutive sequences, every leaf hash recomputed from
its bytes, `range_before` extended by the leaves gives `range_after`, the checkpoint's root when its size is
`last + 1`); a signed checkpoint's root at a larger size needs the later entries: `tradeguard audit verify`
recomputes the whole tree from the archive and the stored entries. The file's SHA-256 is recorded in the
database's `archives` table.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from tradeguard.audit import tlog

__all__ = [
    "FORMAT",
    "SEGMENT_PATTERN",
    "ArchivedEntry",
    "Segment",
    "SegmentError",
    "check_segment",
    "encode_segment",
    "extend_range",
    "range_root",
    "read_segment",
    "segment_name",
]

FORMAT: Final = "tradeguard.audit.archive/1"
SEGMENT_PATTERN: Final = re.compile(r"segment-(\d{20})-(\d{20})\.jsonl")


class SegmentError(ValueError):
    """A segment file that cannot be read as one (the message names the line)."""


@dataclass(frozen=True, slots=True)
class ArchivedEntry:
    """An archived entry (tradeguard.audit.verify's `EntryLike`), with the file it came from."""

    sequence: int
    entry_bytes: bytes
    leaf_hash: bytes
    source: str = ""


@dataclass(frozen=True, slots=True)
class Segment:
    first: int
    last: int
    range_before: list[bytes]
    range_after: list[bytes]
    checkpoint_size: int
    checkpoint_root: bytes
    checkpoint_note: str
    archived_at_us: int
    entries: list[ArchivedEntry]


def segment_name(first: int, last: int) -> str:
    return f"segment-{first:020d}-{last:020d}.jsonl"


def extend_range(peaks: Sequence[bytes], size: int, leaves: Sequence[bytes]) -> list[bytes]:
    """The compact range of `size` leaves (`peaks`, largest first) extended by `leaves`."""
    out = list(peaks)
    for leaf in leaves:
        node, n = leaf, size
        while n & 1:
            node = tlog.node_hash(out.pop(), node)
            n >>= 1
        out.append(node)
        size += 1
    return out


def range_root(peaks: Sequence[bytes]) -> bytes:
    """The root of the tree whose compact range is `peaks`."""
    if not peaks:
        return tlog.EMPTY_ROOT
    node = peaks[-1]
    for peak in reversed(peaks[:-1]):
        node = tlog.node_hash(peak, node)
    return node


def encode_segment(
    first: int,
    range_before: Sequence[bytes],
    entries: Sequence[tuple[int, bytes, bytes]],
    checkpoint: tuple[int, bytes, str],
    archived_at_us: int,
) -> bytes:
    """The file of the segment of `entries` ((sequence, entry bytes, leaf hash), consecutive from `first`),
    given the compact range before it and the covering checkpoint (size, root, note)."""
    if not entries or [e[0] for e in entries] != list(range(first, first + len(entries))):
        raise ValueError("a segment holds consecutive entries from its first sequence")
    last = first + len(entries) - 1
    size, root, note = checkpoint
    if size <= last:
        raise ValueError(f"the checkpoint at size {size} does not cover entry {last}")
    after = extend_range(range_before, first, [leaf for _, _, leaf in entries])
    header = {
        "format": FORMAT,
        "first_sequence": first,
        "last_sequence": last,
        "count": len(entries),
        "range_before": [h.hex() for h in range_before],
        "range_after": [h.hex() for h in after],
        "checkpoint": {"tree_size": size, "root_hash": root.hex(), "note": note},
        "archived_at_us": archived_at_us,
    }
    lines = [json.dumps(header, sort_keys=True, separators=(",", ":"))]
    for sequence, data, leaf in entries:
        line = {"sequence": sequence, "leaf_hash": leaf.hex(), "entry_bytes": base64.b64encode(data).decode()}
        lines.append(json.dumps(line, sort_keys=True, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode("ascii")


def _hash(value: Any, where: str) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise SegmentError(f"{where}: not a 32-byte hash in hex")
    return raw


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SegmentError(f"{where}: not a sequence number")
    return value


def read_segment(data: bytes, name: str) -> Segment:
    """Parse a segment file (SegmentError naming `name` and the line otherwise; nothing is checked here that
    `check_segment` checks)."""
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise SegmentError(f"{name}: not a segment (not ASCII JSON lines)") from None
    if not lines:
        raise SegmentError(f"{name}: empty")
    rows: list[Any] = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise SegmentError(f"{name}:{number}: not a JSON line") from None
        if not isinstance(rows[-1], dict):
            raise SegmentError(f"{name}:{number}: not a JSON object")
    header = rows[0]
    if header.get("format") != FORMAT:
        raise SegmentError(f"{name}:1: not a {FORMAT} header")
    try:
        checkpoint = header["checkpoint"]
        segment = Segment(
            first=_int(header["first_sequence"], f"{name}:1 first_sequence"),
            last=_int(header["last_sequence"], f"{name}:1 last_sequence"),
            range_before=[_hash(h, f"{name}:1 range_before") for h in header["range_before"]],
            range_after=[_hash(h, f"{name}:1 range_after") for h in header["range_after"]],
            checkpoint_size=_int(checkpoint["tree_size"], f"{name}:1 checkpoint.tree_size"),
            checkpoint_root=_hash(checkpoint["root_hash"], f"{name}:1 checkpoint.root_hash"),
            checkpoint_note=str(checkpoint["note"]),
            archived_at_us=_int(header["archived_at_us"], f"{name}:1 archived_at_us"),
            entries=[],
        )
    except (KeyError, TypeError):
        raise SegmentError(f"{name}:1: the header lacks a field") from None
    for number, row in enumerate(rows[1:], 2):
        where = f"{name}:{number}"
        try:
            data_b64 = row["entry_bytes"]
            entry_bytes = base64.b64decode(data_b64, validate=True) if isinstance(data_b64, str) else None
        except (KeyError, binascii.Error, ValueError):
            entry_bytes = None
        if entry_bytes is None:
            raise SegmentError(f"{where}: entry_bytes is not base64")
        segment.entries.append(
            ArchivedEntry(
                _int(row.get("sequence"), f"{where} sequence"),
                entry_bytes,
                _hash(row.get("leaf_hash"), f"{where} leaf_hash"),
                name,
            )
        )
    return segment


def check_segment(segment: Segment, name: str) -> list[str]:
    """What is wrong with `segment` on its own (see the module): problems naming the file and the entry."""
    problems: list[str] = []
    sequences = [e.sequence for e in segment.entries]
    if sequences != list(range(segment.first, segment.last + 1)):
        wrong = next(
            (i + segment.first for i, q in enumerate(sequences) if q != i + segment.first), segment.last + 1
        )
        problems.append(
            f"{name}: entry {wrong}: missing or out of order (the segment should hold entries {segment.first} to "
            f"{segment.last} in order)"
        )
    if len(segment.range_before) != segment.first.bit_count():
        problems.append(f"{name}: range_before is not the compact range of {segment.first} leaves")
        return problems
    for entry in segment.entries:
        actual = tlog.leaf_hash(entry.entry_bytes)
        if actual != entry.leaf_hash:
            problems.append(
                f"{name}: entry {entry.sequence}: altered (its bytes hash to {actual.hex()}, the archive "
                f"recorded {entry.leaf_hash.hex()})"
            )
    leaves = [tlog.leaf_hash(e.entry_bytes) for e in segment.entries]
    if not problems and extend_range(segment.range_before, segment.first, leaves) != segment.range_after:
        problems.append(f"{name}: its entries do not lead from range_before to range_after")
    if segment.checkpoint_size <= segment.last:
        problems.append(f"{name}: its checkpoint (size {segment.checkpoint_size}) does not cover it")
    elif (
        segment.checkpoint_size == segment.last + 1
        and range_root(segment.range_after) != segment.checkpoint_root
    ):
        problems.append(f"{name}: its entries do not give its checkpoint's root")
    return problems
