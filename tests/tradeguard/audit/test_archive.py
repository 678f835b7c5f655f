"""tradeguard/audit/archive.py: the archive segment format. Compact ranges extended leaf by leaf equal the RFC 6962
root of the whole prefix (hypothesis); a segment round-trips and checks clean; any single change to a line is
found by `check_segment` or refused by `read_segment` (never accepted silently); arbitrary bytes are refused
with `SegmentError` only."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradeguard.audit import archive, tlog


def leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [tlog.leaf_hash(salt + i.to_bytes(4, "big")) for i in range(n)]


@given(st.integers(0, 70), st.integers(0, 70))
def test_compact_ranges_extend_to_the_root(first: int, more: int) -> None:
    all_leaves = leaves(first + more)
    before = archive.extend_range([], 0, all_leaves[:first])
    assert len(before) == first.bit_count()
    assert archive.range_root(before) == tlog.root(all_leaves[:first])
    after = archive.extend_range(before, first, all_leaves[first:])
    assert archive.range_root(after) == tlog.root(all_leaves)


def segment_bytes(first: int, count: int, checkpoint_size: int | None = None) -> bytes:
    data = [b"entry %d" % n for n in range(first + count)]
    hashes = [tlog.leaf_hash(d) for d in data]
    before = archive.extend_range([], 0, hashes[:first])
    size = checkpoint_size or first + count
    root = tlog.root(hashes[:size]) if size <= len(hashes) else b"\x07" * 32
    rows = [(n, data[n], hashes[n]) for n in range(first, first + count)]
    return archive.encode_segment(first, before, rows, (size, root, "note\n"), 1)


@given(st.integers(0, 40), st.integers(1, 20))
def test_a_segment_round_trips_and_checks_clean(first: int, count: int) -> None:
    name = archive.segment_name(first, first + count - 1)
    assert archive.SEGMENT_PATTERN.fullmatch(name)
    segment = archive.read_segment(segment_bytes(first, count), name)
    assert (segment.first, segment.last, len(segment.entries)) == (first, first + count - 1, count)
    assert segment.checkpoint_root == archive.range_root(segment.range_after)
    assert archive.check_segment(segment, name) == []


FIELDS = st.sampled_from(["entry_bytes", "leaf_hash", "sequence", "range_before", "range_after", "root"])


@given(st.integers(1, 30), st.integers(2, 12), st.data())
def test_any_change_is_found(first: int, count: int, data: st.DataObject) -> None:
    lines = segment_bytes(first, count).decode().splitlines()
    field = data.draw(FIELDS)
    header = json.loads(lines[0])
    if field in ("range_before", "range_after"):
        header[field] = [h[::-1] for h in header[field]] or ["00" * 32]
        lines[0] = json.dumps(header)
    elif field == "root":
        header["checkpoint"]["root_hash"] = "11" * 32
        lines[0] = json.dumps(header)
    else:
        index = data.draw(st.integers(1, count))
        row = json.loads(lines[index])
        if field == "entry_bytes":
            row[field] = base64.b64encode(b"forged").decode()
        elif field == "leaf_hash":
            row[field] = tlog.leaf_hash(b"forged").hex()
        else:
            row[field] = row[field] + 1
        lines[index] = json.dumps(row)
    name = archive.segment_name(first, first + count - 1)
    try:
        segment = archive.read_segment(("\n".join(lines) + "\n").encode(), name)
    except archive.SegmentError:
        return
    assert archive.check_segment(segment, name) != []


@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_cleanly(junk: bytes) -> None:
    try:
        archive.read_segment(junk, "x.jsonl")
    except archive.SegmentError as error:
        assert str(error).startswith("x.jsonl")


def test_encoding_refuses_what_it_cannot_represent() -> None:
    hashes = leaves(3)
    rows = [(n, b"e", hashes[n]) for n in range(3)]
    with pytest.raises(ValueError, match="consecutive"):
        archive.encode_segment(1, [hashes[0]], rows, (5, hashes[0], "n"), 0)
    with pytest.raises(ValueError, match="does not cover"):
        archive.encode_segment(0, [], rows, (2, hashes[0], "n"), 0)
