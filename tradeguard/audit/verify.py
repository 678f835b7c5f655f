"""The independent verifier behind `tradeguard audit verify`: recompute the log's Merkle tree from the stored
entries' bytes and check it against every signed checkpoint, trusting nothing the store says about itself.

Inputs: the stored entries in sequence order (`sequence`, `entry_bytes`, `leaf_hash`, e.g. from GetEntries), the
published checkpoints oldest first (`tree_size`, `root_hash`, `note`, from ListCheckpoints), the trusted Ed25519
public keys of the checkpoint key (the key vault's versions of it, or keys from a file), and optionally the
service's proofs (`Proofs`), used only to NAME an entry, never to accept the log.

What is checked, and what a problem names:
- every checkpoint's note verifies as a C2SP signed note under one of the trusted keys (`tlog.open_note`), its
  body parses (`tlog.parse_checkpoint`), its origin is the expected one and its body's size and root are the
  checkpoint's; tree sizes grow (one size with two roots is a fork). A checkpoint that fails is a problem and is
  not used further.
- sequences are 0, 1, 2, … : the first missing one (`entry 5: missing (the log goes from entry 4 to entry 6)`),
  or one stored out of place (`entry 5: out of order (stored after entry 7)`); the tree is not compared past it.
- each entry's leaf hash is recomputed from its bytes (RFC 6962: SHA-256(0x00 ‖ bytes)); a stored hash that
  differs names the entry (`entry 1234: altered (its bytes hash to …, the log recorded …)`).
- the recomputed root at each signed checkpoint's size equals the signed root (`tlog.CompactRange`, O(log n)
  memory). Where it does not and no stored hash explains it (the bytes AND their stored hash were altered
  together), the entry is localised between the last matching checkpoint (size s1) and this one (s2): with the
  service's consistency proofs, a binary search finds the shortest recomputed prefix the signed tree does not
  extend; the entry that ends it is named, and the service's inclusion proof for that position (verified against
  the signed root) says what the signed tree holds there — another entry's bytes (`reordered`), the next one's
  (`missing`, the later ones renumbered) or other bytes (`altered`); when that proof does not verify, the entry is
  named as `altered, removed or reordered`. Without proofs, or when the service's proofs do not lead to the
  checkpoint at all, the report says only what it can: the range [s1, s2) differs from the signed checkpoint.
- with the leaf hashes of an earlier export (`exported`, e.g. the compliance export's leaf_hash column), an entry
  whose bytes no longer hash to what was exported is named (`entry 1234: altered (…, the earlier export recorded
  …)`), whatever the service's proofs say.
- consecutive checkpoints: both recomputed from one stream of entries, so one extends the other by
  construction; with `Proofs`, the service's consistency proof between them is verified as well (a failure
  means the service's node store disagrees with its own signed heads).
- entries after the latest checkpoint are counted in `notes` (not yet covered by any signature); a checkpoint
  larger than the log names the first missing entry.

A log pruned by retention (services/audit/retention.py: a prefix archived to segment files, then removed from
the database) is verified from its archive (`archived_entries(directory, report)`, tradeguard/audit/archive.py)
merged with the stored entries (`with_archive`): every segment is checked on its own (`archive.check_segment`,
a problem naming the file and the entry: an altered line, a leaf hash that is not its bytes') and chained to the
one before (consecutive sequences, the compact ranges continuing); a missing segment names the range no file
holds; a sequence both archived and still stored (a crash between the archive file and the database's commit)
must be the same entry in both. Then the whole tree is recomputed from entry 0 and checked against every signed
checkpoint as above, so an archive altered in any way that keeps each file consistent still fails at the roots.
(The SHA-256 of each file is recorded in the database's `archives` table, which the service's API does not
expose: the signed roots are the check here.)

Pure: no grpc, protobuf or database (`tradeguard.audit.tlog` for hashing, proofs and signed notes).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from tradeguard.audit import archive, tlog

__all__ = [
    "CheckpointLike",
    "EntryLike",
    "Proofs",
    "Report",
    "archived_entries",
    "verify_log",
    "with_archive",
]

MAX_PROBLEMS: Final = 20  # a report lists this many at most (the first is the one that matters)


class EntryLike(Protocol):
    """A stored entry: its position, its bytes as hashed, the leaf hash the log recorded for them."""

    @property
    def sequence(self) -> int: ...
    @property
    def entry_bytes(self) -> bytes: ...
    @property
    def leaf_hash(self) -> bytes: ...


class CheckpointLike(Protocol):
    """A published checkpoint: the signed note and the size and root it claims to commit to."""

    @property
    def tree_size(self) -> int: ...
    @property
    def root_hash(self) -> bytes: ...
    @property
    def note(self) -> str: ...


class Proofs(Protocol):
    """The service's proofs (untrusted: every one is verified against a signed root before it is believed)."""

    async def inclusion(self, index: int, size: int) -> tuple[bytes, Sequence[bytes]]:
        """(the leaf hash at `index`, its audit path) in the tree of `size` leaves."""
        ...

    async def consistency(self, size1: int, size2: int) -> Sequence[bytes]: ...


@dataclass
class Report:
    """What the verification found: `ok` when there is no problem; the first problem is the one to act on."""

    entries: int = 0  # entries read
    archived: int = 0  # of which from archive segments
    checkpoints: int = 0  # checkpoints whose signature verified
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # true and worth saying, but not a failure

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def summary(self) -> str:
        if self.ok:
            archived = f" ({self.archived} of them from the archive)" if self.archived else ""
            return f"ok: {self.entries} entries{archived}, {self.checkpoints} signed checkpoints verified"
        others = len(self.problems) - 1
        more = f" (and {others} more problem{'' if others == 1 else 's'})" if others else ""
        return f"FAILED: {self.problems[0]}{more}"


@dataclass(frozen=True, slots=True)
class _Signed:
    size: int
    root: bytes


def _short(digest: bytes) -> str:
    return digest.hex()


def _check_checkpoints(
    checkpoints: Sequence[CheckpointLike],
    public_keys: Sequence[bytes],
    origin: str | None,
    key_name: str | None,
    report: Report,
) -> list[_Signed]:
    """The checkpoints whose signature and body verify, ascending by size, one per size."""
    trusted: list[_Signed] = []
    expected_origin = origin
    for checkpoint in checkpoints:
        where = f"checkpoint at size {checkpoint.tree_size}"
        try:  # unverified: only to choose the key name (the signature binds the body, not the name)
            claimed_origin, _, _ = tlog.parse_checkpoint(checkpoint.note[: checkpoint.note.rfind("\n\n") + 1])
        except tlog.CheckpointError as error:
            report.problem(f"{where}: not a checkpoint note ({error})")
            continue
        name = key_name or expected_origin or claimed_origin
        try:
            body = tlog.open_note(checkpoint.note, name, public_keys)
        except tlog.NoteError as error:
            report.problem(f"{where}: its signature does not verify with the trusted keys ({error})")
            continue
        try:
            body_origin, size, root = tlog.parse_checkpoint(body)
        except tlog.CheckpointError as error:
            report.problem(f"{where}: the signed body is not a checkpoint ({error})")
            continue
        if expected_origin is None:
            expected_origin = body_origin
        if body_origin != expected_origin:
            report.problem(f"{where}: signed for origin {body_origin!r}, not {expected_origin!r}")
            continue
        if size != checkpoint.tree_size or root != checkpoint.root_hash:
            report.problem(
                f"{where}: the signed body says size {size} and root {_short(root)}, the service says size "
                f"{checkpoint.tree_size} and root {_short(checkpoint.root_hash)}"
            )
            continue
        if trusted and size <= trusted[-1].size:
            if size == trusted[-1].size and root == trusted[-1].root:
                continue  # the same head twice
            if size == trusted[-1].size:
                report.problem(
                    f"{where}: two signed roots for one size ({_short(trusted[-1].root)} and {_short(root)}): "
                    "the log was forked"
                )
            else:
                report.problem(f"{where}: listed after the checkpoint at size {trusted[-1].size}")
            continue
        trusted.append(_Signed(size, root))
    report.checkpoints = len(trusted)
    return trusted


class _Range:
    """The entries since the last matching checkpoint: the compact range at its size and their leaf hashes."""

    def __init__(self) -> None:
        self.start_range = tlog.CompactRange()
        self.start = 0
        self.leaves: list[bytes] = []
        self.stored_mismatch = False  # an entry in the range was named by its stored hash already

    def matched(self, current: tlog.CompactRange) -> None:
        self.start_range = copy.deepcopy(current)
        self.start = current.size
        self.leaves.clear()
        self.stored_mismatch = False

    def root_at(self, size: int) -> bytes:
        prefix = copy.deepcopy(self.start_range)
        for leaf in self.leaves[: size - self.start]:
            prefix.append(leaf)
        return prefix.root()


async def _localise(span: _Range, signed: _Signed, proofs: Proofs | None) -> str:
    """Name the entry in [span.start, signed.size) at which the recomputed tree leaves the signed one."""
    s1, s2 = span.start, signed.size
    unnamed = (
        f"entries {s1} to {s2 - 1}: the log differs from the signed checkpoint at size {s2} "
        "(an entry in this range was altered, removed or reordered"
    )
    if proofs is None:
        return unnamed + "; the service's proofs would name it)"

    async def extends(m: int) -> bool:
        """Is the recomputed prefix of m entries a prefix of the signed tree (by the service's proof)?"""
        if m == s1 and s1 > 0:
            return True  # matched a signed checkpoint
        if m == 0:
            return True
        if m == s2:
            return False  # the mismatch being localised
        path = await proofs.consistency(m, s2)
        return tlog.verify_consistency(m, s2, path, span.root_at(m), signed.root)

    low, high = s1, s2  # extends(low) holds, extends(high) does not
    elsewhere = unnamed + "; the service's own proofs do not lead to this checkpoint's root either)"
    try:
        if s1 > 0:
            path = await proofs.consistency(s1, s2)
            if not tlog.verify_consistency(s1, s2, path, span.root_at(s1), signed.root):
                return elsewhere
        while high - low > 1:
            middle = (low + high) // 2
            if await extends(middle):
                low = middle
            else:
                high = middle
        index = high - 1
        ours = span.leaves[index - s1]
        leaf, path = await proofs.inclusion(index, s2)
        if not tlog.verify_inclusion(leaf, index, s2, path, signed.root):  # it cannot say what the tree holds
            return (
                f"entry {index}: altered, removed or reordered (its bytes hash to {_short(ours)}; the log before "
                f"it is proven in the signed checkpoint at size {s2}, the log up to it is not)"
            )
        if leaf == ours:  # the proofs contradict each other
            return unnamed + "; the service's proofs are inconsistent)"
        later = [i for i, other in enumerate(span.leaves) if other == leaf and i + s1 != index]
        if later:
            return (
                f"entry {index}: reordered (the signed checkpoint at size {s2} has the bytes now stored as entry "
                f"{later[0] + s1} at this position)"
            )
        if index + 1 < s2:
            next_leaf, next_path = await proofs.inclusion(index + 1, s2)
            if next_leaf == ours and tlog.verify_inclusion(next_leaf, index + 1, s2, next_path, signed.root):
                return (
                    f"entry {index}: missing (the entry stored as {index} is the signed tree's entry {index + 1}: "
                    "the entries after it were renumbered)"
                )
        return (
            f"entry {index}: altered (its bytes hash to {_short(ours)}, the signed checkpoint at size {s2} "
            f"records {_short(leaf)})"
        )
    except Exception as error:  # the service failing to prove is reported, never raised
        return unnamed + f"; asking the service for proofs failed: {type(error).__name__}: {error})"


async def verify_log(
    entries: AsyncIterable[EntryLike],
    checkpoints: Sequence[CheckpointLike],
    public_keys: Sequence[bytes],
    *,
    origin: str | None = None,
    key_name: str | None = None,
    proofs: Proofs | None = None,
    exported: Mapping[int, bytes] | None = None,
    report: Report | None = None,
) -> Report:
    """Verify the log (see the module's docstring). `origin`: the checkpoints' expected origin (default: the
    first verified checkpoint's); `key_name`: the signed note's key name (default: the origin); `exported`: leaf
    hashes by sequence from an earlier export (an entry whose bytes no longer hash to them is named); `report`:
    the one to fill (e.g. the one `archived_entries` and `with_archive` write their problems to)."""
    report = Report() if report is None else report
    if not public_keys:
        report.problem("no trusted public key: nothing can be verified")
        return report
    signed = _check_checkpoints(checkpoints, public_keys, origin, key_name, report)
    pending = list(signed)  # the checkpoints still to reach, ascending
    tree = tlog.CompactRange()
    span = _Range()
    diverged = False  # a root mismatch was reported: later ones follow from it

    async def reached() -> None:
        nonlocal diverged
        while pending and pending[0].size == tree.size:
            checkpoint = pending.pop(0)
            if diverged:
                continue
            root = tree.root() if tree.size else tlog.EMPTY_ROOT
            if root == checkpoint.root:
                span.matched(tree)
                continue
            diverged = True
            if span.stored_mismatch:
                continue  # already named by the entry whose stored hash differs
            report.problem(await _localise(span, checkpoint, proofs))

    await reached()
    expected = 0
    previous = -1
    first_missing: int | None = None  # the sequence is broken from here: positions no longer mean anything
    skipped_to = 0
    named = False
    async for entry in entries:
        report.entries += 1
        sequence = entry.sequence
        if first_missing is not None:
            if sequence == first_missing and not named:
                report.problem(f"entry {sequence}: out of order (stored after entry {previous})")
                named = True
            previous = sequence
            continue
        if sequence != expected:
            first_missing, skipped_to = expected, sequence
            if sequence < expected:
                report.problem(f"entry {sequence}: out of order (stored after entry {previous})")
                named = True
            previous = sequence
            continue
        actual = tlog.leaf_hash(entry.entry_bytes)
        if actual != entry.leaf_hash:
            report.problem(
                f"entry {sequence}: altered (its bytes hash to {_short(actual)}, "
                f"the log recorded {_short(entry.leaf_hash)})"
            )
            span.stored_mismatch = True
        elif exported is not None and sequence in exported and exported[sequence] != actual:
            report.problem(
                f"entry {sequence}: altered (its bytes hash to {_short(actual)}, "
                f"the earlier export recorded {_short(exported[sequence])})"
            )
            span.stored_mismatch = True
        tree.append(actual)
        if not diverged:
            span.leaves.append(actual)
        expected += 1
        previous = sequence
        await reached()
    broken = first_missing is not None
    if first_missing is not None and not named:
        report.problem(_missing(first_missing, first_missing - 1, skipped_to))
    if not broken and not diverged:
        for checkpoint in pending:
            report.problem(
                f"entry {expected}: missing (the checkpoint at size {checkpoint.size} commits to "
                f"{checkpoint.size} entries, the log holds {expected})"
            )
            break
        if signed and not pending and expected > signed[-1].size:
            report.notes.append(
                f"{expected - signed[-1].size} entries after the latest checkpoint (size {signed[-1].size}) "
                "are not yet covered by a signed checkpoint"
            )
        elif not signed and expected:
            report.notes.append(f"no signed checkpoint covers the {expected} entries")
    if proofs is not None and not diverged:
        await _check_consistency(signed, pending, proofs, report)
    return report


def _missing(first: int, before: int, after: int) -> str:
    if before < 0:
        return f"entry {first}: missing (the log starts at entry {after})"
    return f"entry {first}: missing (the log goes from entry {before} to entry {after})"


async def _check_consistency(
    signed: Sequence[_Signed], unreached: Sequence[_Signed], proofs: Proofs, report: Report
) -> None:
    """The service's consistency proofs between consecutive checkpoints the entries reproduced."""
    reached = [s for s in signed if s not in unreached and s.size > 0]
    for first, second in itertools.pairwise(reached):
        try:
            path = await proofs.consistency(first.size, second.size)
            good = tlog.verify_consistency(first.size, second.size, path, first.root, second.root)
        except Exception as error:  # the service failing to prove is reported, never raised
            report.problem(
                f"checkpoints at sizes {first.size} and {second.size}: asking for the consistency proof failed "
                f"({type(error).__name__}: {error})"
            )
            return
        if not good:
            report.problem(
                f"checkpoints at sizes {first.size} and {second.size}: the service's consistency proof does not "
                "verify (the entries reproduce both, so its node store disagrees with its signed heads)"
            )
            return


# --- a pruned log: its archive ------------------------------------------------------------------------------------


def _segment_files(directory: Path) -> list[tuple[int, int, Path]]:
    found = []
    for path in directory.iterdir():
        match = archive.SEGMENT_PATTERN.fullmatch(path.name)
        if match is not None:
            found.append((int(match.group(1)), int(match.group(2)), path))
    return sorted(found)


async def archived_entries(directory: Path, report: Report) -> AsyncIterator[archive.ArchivedEntry]:
    """The entries of the archive segments in `directory`, in sequence order, one file read at a time; each
    segment checked alone and chained to the one before (see the module), problems written to `report`."""
    try:
        files = await asyncio.to_thread(_segment_files, directory)
    except OSError as error:
        report.problem(f"the archive {directory}: cannot be read ({error.strerror or error})")
        return
    expected, previous = 0, "the start of the log"
    before: list[bytes] = []
    for first, last, path in files:
        name = path.name
        try:
            segment = archive.read_segment(await asyncio.to_thread(path.read_bytes), name)
        except (OSError, archive.SegmentError) as error:
            report.problem(f"{name}: cannot be read as an archive segment ({error})")
            continue
        if (segment.first, segment.last) != (first, last):
            report.problem(f"{name}: holds entries {segment.first} to {segment.last}, not what its name says")
        for problem in archive.check_segment(segment, name):
            report.problem(problem)
        if segment.first > expected:
            report.problem(
                f"entries {expected} to {segment.first - 1}: in no archive segment (a segment file before "
                f"{name} is missing)"
            )
        elif segment.first < expected:
            report.problem(f"{name}: overlaps the segment before it (entries from {segment.first} again)")
        elif segment.range_before != before:
            report.problem(f"{name}: does not continue {previous} (its range_before differs)")
        for entry in segment.entries:
            report.archived += 1
            yield entry
        expected, before, previous = segment.last + 1, segment.range_after, name


async def with_archive(
    archived: AsyncIterable[EntryLike], stored: AsyncIterable[EntryLike], report: Report
) -> AsyncIterator[EntryLike]:
    """The archived entries and the stored ones merged in sequence order: one both archived and stored must be
    the same entry (a problem otherwise; the archived copy is used); entries in neither between the archive's
    end and the first stored one are named (a missing last segment)."""
    a_iter, s_iter = aiter(archived), aiter(stored)
    a = await anext(a_iter, None)
    s = await anext(s_iter, None)
    archived_end = 0
    checked_gap = False
    while a is not None or s is not None:
        if a is not None and (s is None or a.sequence < s.sequence):
            archived_end = max(archived_end, a.sequence + 1)
            yield a
            a = await anext(a_iter, None)
            continue
        if s is None:  # (not reached: a is None here)
            break
        if a is None and not checked_gap:
            checked_gap = True
            if archived_end and s.sequence > archived_end:
                report.problem(
                    f"entries {archived_end} to {s.sequence - 1}: neither in the archive nor in the log (the "
                    "archive's last segment is missing?)"
                )
        if a is not None and a.sequence == s.sequence:
            if a.entry_bytes != s.entry_bytes or a.leaf_hash != s.leaf_hash:
                source = getattr(a, "source", "") or "the archive"
                report.problem(f"entry {a.sequence}: the log and its archived copy in {source} differ")
            archived_end = max(archived_end, a.sequence + 1)
            yield a
            a = await anext(a_iter, None)
        else:
            yield s
        s = await anext(s_iter, None)
