"""tradeguard.audit.verify on logs built here: entries as bytes, checkpoints signed as C2SP notes with a test
Ed25519 key, and (where a test gives them) proofs computed here from the untampered tree, as an intact node store
would give them (RFC 6962 PATH and SUBPROOF, written out below, independent of the service's tree module).

A clean log verifies; altering one entry's bytes (with or without its stored hash), deleting one (a gap, or the
later ones renumbered), swapping two, a bad signature, a checkpoint whose root or size disagrees, and a forked
checkpoint are each named precisely."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tradeguard.audit import tlog
from tradeguard.audit.verify import Report, verify_log

ORIGIN = "tradeguard.test/audit"


@dataclass(frozen=True)
class Stored:
    sequence: int
    entry_bytes: bytes
    leaf_hash: bytes


@dataclass(frozen=True)
class Signed:
    tree_size: int
    root_hash: bytes
    note: str


class Signer:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def checkpoint(self, size: int, root: bytes, origin: str = ORIGIN) -> Signed:
        body = tlog.checkpoint_body(origin, size, root)
        note = tlog.signed_note(body, origin, self.public, self.key.sign(body.encode()))
        return Signed(size, root, note)


def _mth(leaves: Sequence[bytes]) -> bytes:
    return tlog.root(leaves)


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 6962 2.1.1 PATH(m, D[n])."""
    n = len(leaves)
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, leaves[:k]), _mth(leaves[k:])]
    return [*_path(m - k, leaves[k:]), _mth(leaves[:k])]


def _subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    """RFC 6962 2.1.2 SUBPROOF(m, D[n], b)."""
    n = len(leaves)
    if m == n:
        return [] if complete else [_mth(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), _mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), _mth(leaves[:k])]


class TreeProofs:
    """The proofs an intact node store gives: computed from the log as it was appended."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.leaves = list(leaves)
        self.calls = 0

    async def inclusion(self, index: int, size: int) -> tuple[bytes, Sequence[bytes]]:
        self.calls += 1
        return self.leaves[index], _path(index, self.leaves[:size])

    async def consistency(self, size1: int, size2: int) -> Sequence[bytes]:
        self.calls += 1
        return _subproof(size1, self.leaves[:size2], True)


@dataclass
class Log:
    signer: Signer
    entries: list[Stored]
    checkpoints: list[Signed]
    original: list[bytes]  # leaf hashes as appended

    async def verify(self, *, proofs: bool = True, keys: Sequence[bytes] | None = None) -> Report:
        async def stream() -> AsyncIterator[Stored]:
            for entry in self.entries:
                yield entry

        return await verify_log(
            stream(),
            self.checkpoints,
            [self.signer.public] if keys is None else keys,
            origin=ORIGIN,
            proofs=TreeProofs(self.original) if proofs else None,
        )

    def replace(self, index: int, **changes: object) -> None:
        self.entries[index] = dataclasses.replace(self.entries[index], **changes)  # type: ignore[arg-type]


def make_log(size: int = 40, checkpoint_sizes: Sequence[int] = (0, 1, 7, 16, 23, 40)) -> Log:
    signer = Signer()
    entries = []
    for i in range(size):
        data = f"entry {i}: someone did something".encode()
        entries.append(Stored(i, data, tlog.leaf_hash(data)))
    leaves = [e.leaf_hash for e in entries]
    checkpoints = [signer.checkpoint(n, tlog.root(leaves[:n])) for n in checkpoint_sizes]
    return Log(signer, entries, checkpoints, leaves)


def _altered(log: Log, index: int) -> bytes:
    data = log.entries[index].entry_bytes.replace(b"someone", b"nobody!")
    log.replace(index, entry_bytes=data, leaf_hash=tlog.leaf_hash(data))
    return data


async def test_a_clean_log_verifies_with_and_without_proofs() -> None:
    log = make_log()
    for proofs in (True, False):
        report = await log.verify(proofs=proofs)
        assert report.ok, report.problems
        assert (report.entries, report.checkpoints, report.notes) == (40, 6, [])
        assert report.summary() == "ok: 40 entries, 6 signed checkpoints verified"


async def test_entries_after_the_latest_checkpoint_are_a_note_not_a_problem() -> None:
    log = make_log(checkpoint_sizes=(16,))
    report = await log.verify()
    assert report.ok
    assert report.notes == [
        "24 entries after the latest checkpoint (size 16) are not yet covered by a signed checkpoint"
    ]


async def test_altered_bytes_with_the_stored_hash_kept_are_named_by_the_hash() -> None:
    log = make_log()
    recorded = log.entries[12].leaf_hash
    log.replace(12, entry_bytes=b"entry 12: nothing happened")
    report = await log.verify()
    actual = tlog.leaf_hash(b"entry 12: nothing happened")
    assert report.problems == [
        f"entry 12: altered (its bytes hash to {actual.hex()}, the log recorded {recorded.hex()})"
    ]
    assert report.summary().startswith("FAILED: entry 12: altered")


@pytest.mark.parametrize("index", [0, 7, 12, 15, 22, 39])
async def test_altered_bytes_and_hash_together_are_named_by_the_signed_tree(index: int) -> None:
    log = make_log()
    data = _altered(log, index)
    report = await log.verify()
    size = next(c.tree_size for c in log.checkpoints if c.tree_size > index)
    assert report.problems == [
        f"entry {index}: altered (its bytes hash to {tlog.leaf_hash(data).hex()}, the signed checkpoint at size "
        f"{size} records {log.original[index].hex()})"
    ]


async def test_without_proofs_an_altered_entry_is_placed_between_checkpoints() -> None:
    log = make_log()
    _altered(log, 12)
    report = await log.verify(proofs=False)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(
        "entries 7 to 15: the log differs from the signed checkpoint at size 16 (an entry in this range was altered"
    )


async def test_a_deleted_entry_is_missing() -> None:
    log = make_log()
    del log.entries[9]
    assert (await log.verify()).problems == ["entry 9: missing (the log goes from entry 8 to entry 10)"]
    first = make_log()
    del first.entries[0]
    assert (await first.verify()).problems == ["entry 0: missing (the log starts at entry 1)"]


async def test_a_deleted_last_entry_is_missing_by_the_checkpoint() -> None:
    log = make_log()
    del log.entries[39]
    assert (await log.verify()).problems == [
        "entry 39: missing (the checkpoint at size 40 commits to 40 entries, the log holds 39)"
    ]


async def test_a_deleted_entry_with_the_later_ones_renumbered_is_missing() -> None:
    log = make_log()
    del log.entries[9]
    log.entries = [dataclasses.replace(e, sequence=i) for i, e in enumerate(log.entries)]
    report = await log.verify()
    assert report.problems[0] == (
        "entry 9: missing (the entry stored as 9 is the signed tree's entry 10: the entries after it were renumbered)"
    )


async def test_two_swapped_entries_are_reordered() -> None:
    log = make_log()
    a, b = log.entries[10], log.entries[13]
    log.entries[10] = Stored(10, b.entry_bytes, b.leaf_hash)
    log.entries[13] = Stored(13, a.entry_bytes, a.leaf_hash)
    assert (await log.verify()).problems == [
        "entry 10: reordered (the signed checkpoint at size 16 has the bytes now stored as entry 13 at this position)"
    ]


async def test_entries_stored_out_of_sequence_order_are_named() -> None:
    log = make_log()
    log.entries[10], log.entries[13] = log.entries[13], log.entries[10]
    assert (await log.verify()).problems == ["entry 10: out of order (stored after entry 12)"]
    back = make_log()
    back.entries.insert(20, back.entries[5])
    assert (await back.verify()).problems == ["entry 5: out of order (stored after entry 19)"]


async def test_a_checkpoint_with_a_bad_signature_is_named() -> None:
    log = make_log()
    good = log.checkpoints[3]
    body, _, line = good.note.rpartition("\n\n")
    blob = bytearray(__import__("base64").b64decode(line.split(" ")[-1]))
    blob[-1] ^= 1
    forged = body + "\n\n— " + ORIGIN + " " + __import__("base64").b64encode(bytes(blob)).decode() + "\n"
    log.checkpoints[3] = dataclasses.replace(good, note=forged)
    report = await log.verify()
    assert report.problems == [
        f"checkpoint at size 16: its signature does not verify with the trusted keys (note: a signature by {ORIGIN} does not verify)"
    ]
    assert report.checkpoints == 5


async def test_a_checkpoint_signed_by_another_key_is_not_trusted() -> None:
    log = make_log()
    other = Signer()
    log.checkpoints[5] = other.checkpoint(40, log.checkpoints[5].root_hash)
    report = await log.verify()
    assert report.problems == [
        f"checkpoint at size 40: its signature does not verify with the trusted keys (note: no signature by {ORIGIN} with a known key)"
    ]
    # a rotated key: both versions trusted
    assert (await log.verify(keys=[log.signer.public, other.public])).ok
    assert (await log.verify(keys=[])).problems == ["no trusted public key: nothing can be verified"]


async def test_a_signed_checkpoint_whose_root_disagrees_with_the_entries_is_named() -> None:
    log = make_log()
    wrong = tlog.root([*log.original[:22], tlog.leaf_hash(b"invented")])
    log.checkpoints[4] = log.signer.checkpoint(23, wrong)
    differs = (
        "entries 16 to 22: the log differs from the signed checkpoint at size 23 (an entry in this range was"
    )
    bare = await log.verify(proofs=False)
    assert len(bare.problems) == 1 and bare.problems[0].startswith(differs)
    # the service's node store (the tree as appended) does not lead to that root either
    report = await log.verify()
    assert report.problems == [
        differs
        + " altered, removed or reordered; the service's own proofs do not lead to this checkpoint's root "
        "either)"
    ]
    # a store whose tree is the signed one (its entries' bytes and hashes were rewritten): entry 22 is named
    signed_tree = [*log.original[:22], tlog.leaf_hash(b"invented"), *log.original[23:]]
    report = await verify_log(
        _aiter(log.entries), log.checkpoints, [log.signer.public], proofs=TreeProofs(signed_tree)
    )
    assert report.problems == [
        f"entry 22: altered (its bytes hash to {log.original[22].hex()}, the signed checkpoint at size 23 records "
        f"{tlog.leaf_hash(b'invented').hex()})"
    ]


async def test_a_checkpoint_whose_fields_disagree_with_its_signed_body_is_named() -> None:
    log = make_log()
    log.checkpoints[2] = dataclasses.replace(log.checkpoints[2], tree_size=8)
    report = await log.verify()
    assert report.problems == [
        f"checkpoint at size 8: the signed body says size 7 and root {tlog.root(log.original[:7]).hex()}, "
        f"the service says size 8 and root {tlog.root(log.original[:7]).hex()}"
    ]


async def test_a_fork_and_another_origin_are_named() -> None:
    log = make_log()
    other_root = tlog.root([*log.original[:15], tlog.leaf_hash(b"x")])
    log.checkpoints.insert(4, log.signer.checkpoint(16, other_root))
    report = await log.verify()
    assert report.problems == [
        f"checkpoint at size 16: two signed roots for one size ({tlog.root(log.original[:16]).hex()} and "
        f"{other_root.hex()}): the log was forked"
    ]
    foreign = make_log()
    foreign.checkpoints[1] = foreign.signer.checkpoint(
        1, foreign.checkpoints[1].root_hash, origin="elsewhere"
    )
    report = await verify_log(
        _aiter(foreign.entries), foreign.checkpoints, [foreign.signer.public], origin=ORIGIN, key_name=ORIGIN
    )
    assert report.problems[0].startswith("checkpoint at size 1: its signature does not verify")
    report = await verify_log(
        _aiter(foreign.entries),
        foreign.checkpoints,
        [foreign.signer.public],
        origin=ORIGIN,
        key_name="elsewhere",
    )
    assert (
        report.problems[0]
        == "checkpoint at size 0: its signature does not verify with the trusted keys (note: no signature by elsewhere with a known key)"
    )


async def test_a_service_whose_consistency_proofs_fail_is_named() -> None:
    log = make_log()

    class Lying(TreeProofs):
        async def consistency(self, size1: int, size2: int) -> Sequence[bytes]:
            return [tlog.leaf_hash(b"lie")] * 3

    async def stream() -> AsyncIterator[Stored]:
        for entry in log.entries:
            yield entry

    report = await verify_log(stream(), log.checkpoints, [log.signer.public], proofs=Lying(log.original))
    assert report.problems == [
        "checkpoints at sizes 1 and 7: the service's consistency proof does not verify (the entries reproduce "
        "both, so its node store disagrees with its signed heads)"
    ]


async def test_localising_asks_for_few_proofs() -> None:
    log = make_log(size=1000, checkpoint_sizes=(1000,))
    _altered(log, 617)
    proofs = TreeProofs(log.original)

    async def stream() -> AsyncIterator[Stored]:
        for entry in log.entries:
            yield entry

    report = await verify_log(stream(), log.checkpoints, [log.signer.public], proofs=proofs)
    assert report.problems[0].startswith("entry 617: altered")
    assert proofs.calls <= 13  # a binary search over 1,000 entries and one or two inclusion proofs


async def _aiter(entries: Sequence[Stored]) -> AsyncIterator[Stored]:
    for entry in entries:
        yield entry


async def test_a_service_answering_the_stored_leaf_hash_still_names_the_entry() -> None:
    """The inclusion proof's leaf hash read from the altered row: the proof fails, the entry is still named."""
    log = make_log()
    data = _altered(log, 20)
    stored = [e.leaf_hash for e in log.entries]

    class FromRows(TreeProofs):
        async def inclusion(self, index: int, size: int) -> tuple[bytes, Sequence[bytes]]:
            _, path = await super().inclusion(index, size)
            return stored[index], path

    report = await verify_log(
        _aiter(log.entries), log.checkpoints, [log.signer.public], proofs=FromRows(log.original)
    )
    assert report.problems == [
        f"entry 20: altered, removed or reordered (its bytes hash to {tlog.leaf_hash(data).hex()}; the log before it "
        "is proven in the signed checkpoint at size 23, the log up to it is not)"
    ]


async def test_an_earlier_export_names_an_entry_altered_with_its_hash() -> None:
    log = make_log()
    exported = {i: leaf for i, leaf in enumerate(log.original) if i < 30}
    data = _altered(log, 25)
    report = await verify_log(_aiter(log.entries), log.checkpoints, [log.signer.public], exported=exported)
    assert report.problems == [
        f"entry 25: altered (its bytes hash to {tlog.leaf_hash(data).hex()}, the earlier export recorded "
        f"{log.original[25].hex()})"
    ]
    clean = make_log()
    assert (
        await verify_log(
            _aiter(clean.entries),
            clean.checkpoints,
            [clean.signer.public],
            exported=dict(enumerate(clean.original)),
        )
    ).ok
