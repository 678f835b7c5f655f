"""tradeguard.audit.tlog against published vectors and an independent brute force.

- Published vectors (rfc6962_vectors.py): RFC 6962 hashes, roots for 0..8 leaves, inclusion and consistency proofs
  and the corruptions the Go verifier's tests apply to them; the Go sumdb/note keys and notes; the C2SP example.
- Brute force: RFC 6962's recursive definitions (MTH, PATH, SUBPROOF) over 64 (proofs) and 300 (roots) leaves,
  with their own SHA-256 calls. Every proof for every (index, size) and (size1, size2) up to 64 verifies.
- Tampering: a flipped bit, a replaced, dropped or added hash, a wrong leaf or root always fails. A wrong index or
  size is judged by a second, recursive evaluator written from RFC 6962's tree shape (not RFC 9162's bit loop):
  `verify_*` must agree with it exactly. The two differ from "always fails" only where the wrong size gives the
  tree the same shape (e.g. leaf 0 of 3 and of 4), which a signed checkpoint's (size, root) pair rules out.
- Checkpoints and notes: round trips, refusals, and garbage that raises nothing but CheckpointError / NoteError.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from functools import cache

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tradeguard.audit import rfc6962_vectors as v
from tradeguard.audit import tlog
from tradeguard.audit.tlog import CheckpointError, NoteError

SETTINGS = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

# --- the brute force -------------------------------------------------------------------------------------


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def h(left: bytes, right: bytes) -> bytes:
    return sha(b"\x01" + left + right)


def split(n: int) -> int:
    """The largest power of two strictly below n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


DATA = [f"audit entry {i}".encode() for i in range(300)]
HASHES = [sha(b"\x00" + d) for d in DATA]
PROOF_LEAVES = 64


@cache
def mth(start: int, end: int) -> bytes:
    """RFC 6962 2.1: MTH(D[start:end])."""
    n = end - start
    if n == 0:
        return sha(b"")
    if n == 1:
        return HASHES[start]
    k = split(n)
    return h(mth(start, start + k), mth(start + k, end))


def path(m: int, start: int, end: int) -> list[bytes]:
    """RFC 6962 2.1.1: PATH(m, D[start:end])."""
    n = end - start
    if n == 1:
        return []
    k = split(n)
    if m < k:
        return [*path(m, start, start + k), mth(start + k, end)]
    return [*path(m - k, start + k, end), mth(start, start + k)]


def subproof(m: int, start: int, end: int, complete: bool) -> list[bytes]:
    """RFC 6962 2.1.2: SUBPROOF(m, D[start:end], b)."""
    n = end - start
    if m == n:
        return [] if complete else [mth(start, end)]
    k = split(n)
    if m <= k:
        return [*subproof(m, start, start + k, complete), mth(start + k, end)]
    return [*subproof(m - k, start + k, end, False), mth(start, start + k)]


def inclusion(index: int, size: int) -> list[bytes]:
    return path(index, 0, size)


def consistency(size1: int, size2: int) -> list[bytes]:
    return [] if size1 in (0, size2) else subproof(size1, 0, size2, True)


# --- the recursive evaluators (what a proof proves, read top-down from the tree's shape) -------------------


def root_from_path(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """The root that `proof` (bottom-up siblings) gives leaf `index` of a tree of `size`; None if its length
    does not fit that shape."""
    if size == 1:
        return leaf if not proof else None
    if not proof:
        return None
    k = split(size)
    top, rest = proof[-1], proof[:-1]
    if index < k:
        sub = root_from_path(index, k, leaf, rest)
        return None if sub is None else h(sub, top)
    sub = root_from_path(index - k, size - k, leaf, rest)
    return None if sub is None else h(top, sub)


def expect_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    if not (0 <= index < size) or any(len(x) != 32 for x in (leaf, root, *proof)):
        return False
    return root_from_path(index, size, leaf, proof) == root


def roots_from_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes
) -> tuple[bytes, bytes] | None:
    """(old root, new root) that `proof` gives for 0 < size1 < size2, read as SUBPROOF's shape; None if its
    length does not fit."""

    def walk(m: int, n: int, nodes: Sequence[bytes], complete: bool) -> tuple[bytes, bytes] | None:
        if m == n:
            if complete:
                return (root1, root1) if not nodes else None
            return (nodes[0], nodes[0]) if len(nodes) == 1 else None
        if not nodes:
            return None
        k = split(n)
        top, rest = nodes[-1], nodes[:-1]
        if m <= k:
            sub = walk(m, k, rest, complete)
            return None if sub is None else (sub[0], h(sub[1], top))
        sub = walk(m - k, n - k, rest, False)
        return None if sub is None else (h(top, sub[0]), h(top, sub[1]))

    return walk(size1, size2, proof, True)


def expect_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> bool:
    if not (0 <= size1 <= size2) or any(len(x) != 32 for x in (root1, root2, *proof)):
        return False
    if size1 == 0:
        return not proof and root1 == sha(b"") and (size2 > 0 or root2 == sha(b""))
    if size1 == size2:
        return not proof and root1 == root2
    return roots_from_consistency(size1, size2, proof, root1) == (root1, root2)


def flip(value: bytes, bit: int) -> bytes:
    data = bytearray(value)
    data[bit // 8 % len(data)] ^= 1 << (bit % 8)
    return bytes(data)


# --- hashing and roots: published vectors ----------------------------------------------------------------


def test_hashes_match_the_published_rfc6962_vectors() -> None:
    assert tlog.EMPTY_ROOT == v.EMPTY_ROOT
    assert tlog.leaf_hash(b"") == v.EMPTY_LEAF_HASH != tlog.EMPTY_ROOT
    assert tlog.leaf_hash(b"L123456") == v.L123456_LEAF_HASH
    assert tlog.node_hash(b"N123", b"N456") == v.N123_N456_NODE_HASH
    assert tlog.node_hash(v.SOME_HASH, v.EMPTY_ROOT) != tlog.node_hash(v.EMPTY_ROOT, v.SOME_HASH)
    assert tlog.node_hash(v.SOME_HASH, v.EMPTY_ROOT) != tlog.leaf_hash(v.SOME_HASH + v.EMPTY_ROOT)


def test_roots_match_the_published_vectors() -> None:
    hashes = [tlog.leaf_hash(leaf) for leaf in v.LEAVES]
    assert tlog.root([]) == v.EMPTY_ROOT
    for size in range(1, 9):
        assert tlog.root(hashes[:size]) == v.ROOTS[size - 1], size


def test_roots_match_the_brute_force_and_compact_range_every_prefix() -> None:
    compact = tlog.CompactRange()
    assert (compact.size, compact.root()) == (0, tlog.EMPTY_ROOT)
    for size in range(1, len(HASHES) + 1):
        compact.append(HASHES[size - 1])
        assert compact.size == size
        assert compact.root() == mth(0, size) == tlog.root(HASHES[:size]), size
        assert len(compact._peaks) == bin(size).count("1")  # O(log n): one hash per set bit of the size


def test_leaf_hashes_must_be_32_bytes() -> None:
    compact = tlog.CompactRange()
    for bad in (b"", b"x" * 31, b"x" * 33, bytearray(32)):
        with pytest.raises(ValueError, match="32 bytes"):
            compact.append(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="32 bytes"):
            tlog.root([HASHES[0], bad])  # type: ignore[list-item]
    assert compact.size == 0


# --- inclusion proofs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("leaf", "size", "proof"), v.INCLUSION_PROOFS)
def test_published_inclusion_proofs_verify_and_their_corruptions_fail(
    leaf: int, size: int, proof: list[bytes]
) -> None:
    index, root, leaf_hash = leaf - 1, v.ROOTS[size - 1], tlog.leaf_hash(v.LEAVES[leaf - 1])
    assert tlog.verify_inclusion(leaf_hash, index, size, proof, root)
    probes = [
        (leaf_hash, index - 1, size, proof, root),
        (leaf_hash, index + 1, size, proof, root),
        (leaf_hash, index ^ 2, size, proof, root),
        (leaf_hash, index, size * 2, proof, root),
        (leaf_hash, index, size // 2, proof, root),
        (b"WrongLeaf", index, size, proof, root),
        (leaf_hash, index, size, proof, v.EMPTY_ROOT),
        (leaf_hash, index, size, proof, v.SOME_HASH),
        (leaf_hash, index, size, [*proof, b""], root),
        (leaf_hash, index, size, [*proof, root], root),
        (leaf_hash, index, size, [b"", *proof], root),
        (leaf_hash, index, size, [root, *proof], root),
    ]
    probes += [
        (leaf_hash, index, size, [*proof[:i], flip(proof[i], 3), *proof[i + 1 :]], root)
        for i in range(len(proof))
    ]
    if proof:
        probes.append((leaf_hash, index, size, proof[:-1], root))
    if len(proof) > 1:
        probes.append((leaf_hash, index, size, [proof[0], v.SOME_HASH, *proof[1:]], root))
    for probe in probes:
        assert not tlog.verify_inclusion(*probe), probe


def test_inclusion_in_an_empty_or_one_leaf_tree() -> None:
    single = tlog.leaf_hash(b"data")
    assert tlog.verify_inclusion(single, 0, 1, [], single)
    for index, size in ((0, 0), (1, 0), (1, 1), (2, 1), (-1, 1)):
        assert not tlog.verify_inclusion(single, index, size, [], single)
        assert not tlog.verify_inclusion(v.SOME_HASH, index, size, [], v.EMPTY_ROOT)
    assert not tlog.verify_inclusion(single, 0, 1, [], b"")
    assert not tlog.verify_inclusion(b"", 0, 1, [], single)
    assert not tlog.verify_inclusion(single, True, 2, [single], single)


def test_every_inclusion_proof_up_to_64_leaves_verifies() -> None:
    for size in range(1, PROOF_LEAVES + 1):
        root = mth(0, size)
        for index in range(size):
            proof = inclusion(index, size)
            assert tlog.verify_inclusion(HASHES[index], index, size, proof, root), (index, size)
            assert root_from_path(index, size, HASHES[index], proof) == root
            # wrong sizes and indices: exactly what the tree's shape allows
            for other_size in {size - 1, size + 1, size * 2, size // 2, size + 2}:
                expected = expect_inclusion(HASHES[index], index, other_size, proof, root)
                assert tlog.verify_inclusion(HASHES[index], index, other_size, proof, root) == expected
            for other in {index - 1, index + 1, index ^ 1, index ^ 2}:
                if 0 <= other < len(HASHES):
                    expected = expect_inclusion(HASHES[other], other, size, proof, root)
                    assert tlog.verify_inclusion(HASHES[other], other, size, proof, root) == expected
                    assert not tlog.verify_inclusion(HASHES[index], other, size, proof, root)


def test_a_wrong_size_of_the_same_shape_is_the_only_way_a_right_proof_verifies_elsewhere() -> None:
    # Leaf 0 of 3 leaves and of 4 leaves have proofs of the same shape (two right siblings): the RFC algorithm
    # (any algorithm) cannot tell them apart, which is why a proof's size and root come from one checkpoint.
    proof = inclusion(0, 3)
    assert tlog.verify_inclusion(HASHES[0], 0, 4, proof, mth(0, 3))
    assert not tlog.verify_inclusion(HASHES[0], 0, 4, proof, mth(0, 4))


@st.composite
def inclusion_cases(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, PROOF_LEAVES))
    return draw(st.integers(0, size - 1)), size


@SETTINGS
@given(case=inclusion_cases(), data=st.data())
def test_a_tampered_inclusion_proof_fails(case: tuple[int, int], data: st.DataObject) -> None:
    index, size = case
    leaf, root, proof = HASHES[index], mth(0, size), inclusion(index, size)
    some = data.draw(st.binary(min_size=32, max_size=32))
    kind = data.draw(st.sampled_from(["bit", "replace", "drop", "add", "leaf", "root", "short", "long"]))
    if kind in ("bit", "replace", "drop") and not proof:
        kind = "add"
    if kind == "bit":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = flip(proof[i], data.draw(st.integers(0, 255)))
    elif kind == "replace":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = some if some != proof[i] else flip(some, 0)
    elif kind == "drop":
        del proof[data.draw(st.integers(0, len(proof) - 1))]
    elif kind == "add":
        proof.insert(data.draw(st.integers(0, len(proof))), some)
    elif kind == "leaf":
        leaf = flip(leaf, data.draw(st.integers(0, 255)))
    elif kind == "root":
        root = flip(root, data.draw(st.integers(0, 255)))
    elif kind == "short":
        proof = [p[: data.draw(st.integers(0, 31))] for p in proof] or [b""]
    else:
        proof = [p + b"\x00" for p in proof] or [b"\x00" * 33]
    assert not tlog.verify_inclusion(leaf, index, size, proof, root)


@SETTINGS
@given(case=inclusion_cases(), other_index=st.integers(-2, 70), other_size=st.integers(-2, 140))
def test_an_inclusion_proof_under_another_index_or_size_verifies_only_where_the_shape_allows(
    case: tuple[int, int], other_index: int, other_size: int
) -> None:
    index, size = case
    proof, root = inclusion(index, size), mth(0, size)
    expected = expect_inclusion(HASHES[index], other_index, other_size, proof, root)
    assert tlog.verify_inclusion(HASHES[index], other_index, other_size, proof, root) == expected
    if other_index != index:
        assert not tlog.verify_inclusion(HASHES[index], other_index, size, proof, root)


# --- consistency proofs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("size1", "size2", "proof"), v.CONSISTENCY_PROOFS)
def test_published_consistency_proofs_verify_and_their_corruptions_fail(
    size1: int, size2: int, proof: list[bytes]
) -> None:
    root1, root2 = v.ROOTS[size1 - 1], v.ROOTS[size2 - 1]
    assert tlog.verify_consistency(size1, size2, proof, root1, root2)
    if not proof:
        return
    probes = [
        (size1 - 1, size2, proof, root1, root2),
        (size1 + 1, size2, proof, root1, root2),
        (size1 ^ 2, size2, proof, root1, root2),
        (size1, size2 * 2, proof, root1, root2),
        (size1, size2 // 2, proof, root1, root2),
        (size1, size2, proof, b"WrongRoot", root2),
        (size1, size2, proof, root1, b"WrongRoot"),
        (size1, size2, proof, root2, root1),
        (size1, size2, [], root1, root2),
        (size1, size2, [*proof, b""], root1, root2),
        (size1, size2, [*proof, root1], root1, root2),
        (size1, size2, [*proof, root2], root1, root2),
        (size1, size2, [b"", *proof], root1, root2),
        (size1, size2, [root1, *proof], root1, root2),
        (size1, size2, [root2, *proof], root1, root2),
        (size1, size2, [proof[0], *proof], root1, root2),
        (size1, size2, proof[:-1], root1, root2),
    ]
    probes += [
        (size1, size2, [*proof[:i], flip(proof[i], 4), *proof[i + 1 :]], root1, root2)
        for i in range(len(proof))
    ]
    for probe in probes:
        assert not tlog.verify_consistency(*probe), probe


def test_consistency_edge_cases() -> None:
    empty, some = v.EMPTY_ROOT, v.SOME_HASH
    assert tlog.verify_consistency(0, 0, [], empty, empty)
    assert tlog.verify_consistency(0, 5, [], empty, v.ROOTS[4])  # every tree extends the empty one
    assert tlog.verify_consistency(1, 1, [], some, some)
    assert not tlog.verify_consistency(0, 0, [], some, some)  # size 0 has the empty root, nothing else
    assert not tlog.verify_consistency(0, 1, [], some, v.ROOTS[0])
    assert not tlog.verify_consistency(0, 0, [], empty, some)
    assert not tlog.verify_consistency(1, 1, [], empty, some)
    assert not tlog.verify_consistency(1, 0, [], some, some)  # time travel
    assert not tlog.verify_consistency(2, 1, [], some, some)
    assert not tlog.verify_consistency(1, 2, [], v.ROOTS[0], v.ROOTS[1])  # an empty proof proves nothing
    for size1, size2 in ((0, 0), (0, 1), (1, 1)):
        assert not tlog.verify_consistency(size1, size2, [empty], empty, empty)  # nothing to prove: no proof
    assert not tlog.verify_consistency(-1, 1, [], empty, empty)
    assert not tlog.verify_consistency(True, 2, [HASHES[1]], HASHES[0], mth(0, 2))
    assert tlog.verify_consistency(1, 2, [HASHES[1]], HASHES[0], mth(0, 2))


def test_every_consistency_proof_up_to_64_leaves_verifies() -> None:
    for size2 in range(PROOF_LEAVES + 1):
        root2 = mth(0, size2)
        for size1 in range(size2 + 1):
            root1, proof = mth(0, size1), consistency(size1, size2)
            assert tlog.verify_consistency(size1, size2, proof, root1, root2), (size1, size2)
            assert expect_consistency(size1, size2, proof, root1, root2)
            for other1, other2 in {
                (size1 - 1, size2),
                (size1 + 1, size2),
                (size1 ^ 2, size2),
                (size1, size2 - 1),
                (size1, size2 + 1),
                (size1, size2 * 2),
                (size1, size2 // 2),
            }:
                expected = expect_consistency(other1, other2, proof, root1, root2)
                assert tlog.verify_consistency(other1, other2, proof, root1, root2) == expected, (
                    size1,
                    size2,
                    other1,
                    other2,
                )


@st.composite
def consistency_cases(draw: st.DrawFn) -> tuple[int, int]:
    size2 = draw(st.integers(2, PROOF_LEAVES))
    return draw(st.integers(1, size2 - 1)), size2


@SETTINGS
@given(case=consistency_cases(), data=st.data())
def test_a_tampered_consistency_proof_fails(case: tuple[int, int], data: st.DataObject) -> None:
    size1, size2 = case
    root1, root2, proof = mth(0, size1), mth(0, size2), consistency(size1, size2)
    some = data.draw(st.binary(min_size=32, max_size=32))
    kind = data.draw(st.sampled_from(["bit", "replace", "drop", "add", "root1", "root2", "short", "swap"]))
    if kind == "bit":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = flip(proof[i], data.draw(st.integers(0, 255)))
    elif kind == "replace":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = some if some != proof[i] else flip(some, 0)
    elif kind == "drop":
        del proof[data.draw(st.integers(0, len(proof) - 1))]
    elif kind == "add":
        proof.insert(data.draw(st.integers(0, len(proof))), some)
    elif kind == "root1":
        root1 = flip(root1, data.draw(st.integers(0, 255)))
    elif kind == "root2":
        root2 = flip(root2, data.draw(st.integers(0, 255)))
    elif kind == "short":
        i = data.draw(st.integers(0, len(proof) - 1))
        proof[i] = proof[i][:31]
    else:
        root1, root2 = root2, root1
    assert not tlog.verify_consistency(size1, size2, proof, root1, root2)


@SETTINGS
@given(case=consistency_cases(), other1=st.integers(-1, 70), other2=st.integers(-1, 140))
def test_a_consistency_proof_under_other_sizes_verifies_only_where_the_shape_allows(
    case: tuple[int, int], other1: int, other2: int
) -> None:
    size1, size2 = case
    proof, root1, root2 = consistency(size1, size2), mth(0, size1), mth(0, size2)
    expected = expect_consistency(other1, other2, proof, root1, root2)
    assert tlog.verify_consistency(other1, other2, proof, root1, root2) == expected


def test_oversized_proofs_and_sizes_are_refused_without_work() -> None:
    big = tlog.MAX_TREE_SIZE
    assert not tlog.verify_inclusion(HASHES[0], 0, big + 1, [], HASHES[0])
    assert not tlog.verify_inclusion(HASHES[0], 0, 2, [HASHES[1]] * 65, mth(0, 2))
    assert not tlog.verify_consistency(1, big + 1, [HASHES[1]], HASHES[0], mth(0, 2))
    assert not tlog.verify_consistency(1, 2, [HASHES[1]] * 129, HASHES[0], mth(0, 2))


# --- checkpoints -----------------------------------------------------------------------------------------

ROOT_64 = mth(0, 64)
NAME_CHARS = st.characters(
    blacklist_categories=["Cc", "Cs", "Zs", "Zl", "Zp"], blacklist_characters="+\x85\u180e\u200b\ufeff"
)
NAMES = st.text(NAME_CHARS, min_size=1, max_size=40).filter(lambda s: not any(c.isspace() for c in s))


def test_the_c2sp_example_checkpoint_parses_and_renders_back() -> None:
    origin, size, root = tlog.parse_checkpoint(v.C2SP_CHECKPOINT_BODY)
    assert (origin, size) == ("example.com/behind-the-sofa", 20852163)
    assert base64.b64encode(root).decode() == "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="
    assert tlog.checkpoint_body(origin, size, root) == v.C2SP_CHECKPOINT_BODY


def test_a_checkpoint_body_is_three_lines() -> None:
    body = tlog.checkpoint_body("tradeguard.local/audit", 0, tlog.EMPTY_ROOT)
    assert body == "tradeguard.local/audit\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    assert tlog.parse_checkpoint(body) == ("tradeguard.local/audit", 0, tlog.EMPTY_ROOT)


@SETTINGS
@given(origin=NAMES, size=st.integers(0, tlog.MAX_TREE_SIZE), root=st.binary(min_size=32, max_size=32))
def test_checkpoints_round_trip(origin: str, size: int, root: bytes) -> None:
    body = tlog.checkpoint_body(origin, size, root)
    assert tlog.parse_checkpoint(body) == (origin, size, root)
    assert tlog.parse_checkpoint(body + "extension line\nanother one\n") == (origin, size, root)


@pytest.mark.parametrize(
    "body",
    [
        "",
        "\n",
        "o\n1\n",
        "o\n1\n" + "A" * 43 + "=",  # no final newline
        "\n1\n" + base64.b64encode(ROOT_64).decode() + "\n",  # empty origin
        *(
            f"o\n{size}\n{base64.b64encode(ROOT_64).decode()}\n"
            for size in (
                "",
                "01",
                "00",
                "+1",
                "-1",
                " 1",
                "1 ",
                "1_0",
                "\u0661",
                "0x1",
                "1e3",
                str(2**63),
                "9" * 30,
            )
        ),
        *(
            f"o\n1\n{root}\n"
            for root in (
                base64.b64encode(ROOT_64).decode()[:-1],  # no padding
                base64.b64encode(ROOT_64).decode().rstrip("=") + "A",
                base64.b64encode(ROOT_64[:31]).decode(),
                base64.b64encode(ROOT_64 + b"\x00").decode(),
                base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # the URL-safe alphabet
                "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2J=",  # non-canonical: stray bits in the last character
                " " + base64.b64encode(ROOT_64).decode()[1:],
            )
        ),
        "o\n1\n" + base64.b64encode(ROOT_64).decode() + "\n\n",  # an empty extension line
        "o\n1\n" + base64.b64encode(ROOT_64).decode() + "\n\nx\n",
        "o\r\n1\n" + base64.b64encode(ROOT_64).decode() + "\n",
        "o\t\n1\n" + base64.b64encode(ROOT_64).decode() + "\n",
        "o\x00\n1\n" + base64.b64encode(ROOT_64).decode() + "\n",
        "o\udcff\n1\n" + base64.b64encode(ROOT_64).decode() + "\n",  # not UTF-8
        "o\n1\n" + base64.b64encode(ROOT_64).decode() + "\n" + "x" * 70000 + "\n",
    ],
)
def test_malformed_checkpoints_are_refused(body: str) -> None:
    with pytest.raises(CheckpointError):
        tlog.parse_checkpoint(body)


@pytest.mark.parametrize(
    ("origin", "size", "root"),
    [
        ("", 1, ROOT_64),
        ("a b", 1, ROOT_64),
        ("a+b", 1, ROOT_64),
        ("a\nb", 1, ROOT_64),
        ("\u00a0a", 1, ROOT_64),
        ("a\udcff", 1, ROOT_64),
        ("o", -1, ROOT_64),
        ("o", tlog.MAX_TREE_SIZE + 1, ROOT_64),
        ("o", True, ROOT_64),
        ("o", 1, ROOT_64[:31]),
        ("o", 1, bytearray(ROOT_64)),
    ],
)
def test_checkpoint_body_refuses_what_cannot_be_a_checkpoint(origin: str, size: int, root: bytes) -> None:
    with pytest.raises(CheckpointError):
        tlog.checkpoint_body(origin, size, root)


@SETTINGS
@given(st.text())
def test_garbage_raises_nothing_but_checkpoint_error(body: str) -> None:
    try:
        origin, size, root = tlog.parse_checkpoint(body)
    except CheckpointError:
        return
    assert origin and 0 <= size <= tlog.MAX_TREE_SIZE and len(root) == 32


@SETTINGS
@given(
    size=st.integers(0, 10**6),
    position=st.integers(0, 200),
    text=st.text(st.characters(codec="utf-8"), max_size=3),
    remove=st.integers(0, 3),
)
def test_a_mangled_checkpoint_parses_or_raises_checkpoint_error(
    size: int, position: int, text: str, remove: int
) -> None:
    body = tlog.checkpoint_body("example.com/log", size, ROOT_64)
    position %= len(body) + 1
    mangled = body[:position] + text + body[position + remove :]
    try:
        parsed = tlog.parse_checkpoint(mangled)
    except CheckpointError:
        return
    origin, size, root = parsed
    assert mangled.split("\n")[:3] == [origin, str(size), base64.b64encode(root).decode()]


# --- signed notes ----------------------------------------------------------------------------------------


def verifier_key(vkey: str) -> tuple[str, bytes, bytes]:
    """(name, key hash, raw public key) of a Go sumdb/note verifier key."""
    name, hash_hex, encoded = vkey.split("+", 2)
    raw = base64.b64decode(encoded)
    assert raw[0] == 1 and len(raw) == 33
    return name, bytes.fromhex(hash_hex), raw[1:]


PETER, PETER_HASH, PETER_KEY = verifier_key(v.PETER_VERIFIER_KEY)
ENOCH, ENOCH_HASH, ENOCH_KEY = verifier_key(v.ENOCH_VERIFIER_KEY)


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_key_hashes_match_the_go_verifier_keys() -> None:
    assert tlog.key_hash(PETER, PETER_KEY) == PETER_HASH == bytes.fromhex("c74f20a3")
    assert tlog.key_hash(ENOCH, ENOCH_KEY) == ENOCH_HASH == bytes.fromhex("af0cfe78")
    for name, key in (("", PETER_KEY), ("a b", PETER_KEY), ("a+b", PETER_KEY), (PETER, PETER_KEY[:31])):
        with pytest.raises(NoteError):
            tlog.key_hash(name, key)


def test_the_go_note_verifies_and_our_signing_reproduces_it_byte_for_byte() -> None:
    assert tlog.open_note(v.PETER_NOTE, PETER, [PETER_KEY]) == v.NOTE_TEXT
    seed = base64.b64decode(v.PETER_SIGNER_KEY.split("+", 4)[4])[1:]
    private = Ed25519PrivateKey.from_private_bytes(seed)
    assert raw_public(private) == PETER_KEY
    signature = private.sign(v.NOTE_TEXT.encode())
    assert tlog.signed_note(v.NOTE_TEXT, PETER, PETER_KEY, signature) == v.PETER_NOTE


def test_notes_with_several_signers() -> None:
    both = v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE + v.ENOCH_SIG_LINE
    assert tlog.open_note(both, PETER, [PETER_KEY]) == v.NOTE_TEXT  # Enoch's line: another signer, ignored
    assert tlog.open_note(both, ENOCH, [ENOCH_KEY]) == v.NOTE_TEXT
    assert tlog.open_note(both, PETER, [ENOCH_KEY, PETER_KEY]) == v.NOTE_TEXT
    with pytest.raises(NoteError, match="no signature"):
        tlog.open_note(both, PETER, [ENOCH_KEY])  # Peter's name with an unknown key hash: ignored, none left
    with pytest.raises(NoteError, match="no signature"):
        tlog.open_note(both, PETER, [])
    with pytest.raises(NoteError, match="no signature"):
        tlog.open_note(v.NOTE_TEXT + "\n" + v.ENOCH_SIG_LINE, PETER, [PETER_KEY])
    enoch_abcd = v.ENOCH_SIG_LINE[:60] + "ABCD" + v.ENOCH_SIG_LINE[60:]
    noisy = v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE * 2 + v.ENOCH_SIG_LINE * 2 + enoch_abcd
    assert tlog.open_note(noisy, PETER, [PETER_KEY]) == v.NOTE_TEXT
    with pytest.raises(NoteError, match="does not verify"):
        tlog.open_note(noisy, ENOCH, [ENOCH_KEY])  # a known key's bad signature rejects the whole note


def test_the_signature_cap() -> None:
    assert tlog.MAX_SIGNATURES >= 16  # the spec's floor
    many = v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE * tlog.MAX_SIGNATURES
    assert tlog.open_note(many, PETER, [PETER_KEY]) == v.NOTE_TEXT
    with pytest.raises(NoteError, match="more than"):
        tlog.open_note(many + v.PETER_SIG_LINE, PETER, [PETER_KEY])
    with pytest.raises(NoteError, match="more than"):
        tlog.open_note(many + v.PETER_SIG_LINE, PETER, [])


@pytest.mark.parametrize(
    "note",
    [
        v.NOTE_TEXT,
        v.NOTE_TEXT + "\n",
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE[:-1],
        "\x01" + v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE,
        "\udcff" + v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE,  # an invalid UTF-8 byte, as Python decodes it
        v.NOTE_TEXT
        + "\n"
        + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE + "Unexpected line.\n",
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE + "\n",
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE.replace("— ", "-- "),
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE.replace("— ", "—"),
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE.replace("— PeterNeumann", "— Peter+Neumann"),
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE.replace("AM=", "AM"),  # unpadded
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE.replace("x08go/", "x08go_"),  # the URL-safe alphabet
        v.NOTE_TEXT + "\n" + "— PeterNeumann \n",
        v.NOTE_TEXT + "\n" + "— PeterNeumann x08g\n",  # shorter than a key hash and a byte
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE.replace("\n", "\r\n"),
        v.NOTE_TEXT.replace("\n", "\r\n") + "\n" + v.PETER_SIG_LINE,
        v.NOTE_TEXT.replace(" ", "\t") + "\n" + v.PETER_SIG_LINE,
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE + "x" * tlog.MAX_NOTE_BYTES,
    ],
)
def test_malformed_notes_are_refused(note: str) -> None:
    with pytest.raises(NoteError):
        tlog.open_note(note, PETER, [PETER_KEY])


def test_a_tampered_go_note_is_refused() -> None:
    tampered = [
        v.PETER_NOTE.replace("cryptography", "cryptographY"),  # body
        v.PETER_NOTE.replace("problem is.\n", "problem is\n"),
        "x" + v.PETER_NOTE,
        v.PETER_NOTE.replace("\n\n", "\n\n\n"),  # a blank line added to the body
        v.PETER_NOTE.replace("— PeterNeumann", "— PeterNeumanm"),  # name
        v.NOTE_TEXT + "\n" + v.PETER_SIG_LINE[:60] + "ABCD" + v.PETER_SIG_LINE[60:],  # signature
    ]
    encoded = v.PETER_SIG_LINE.split(" ")[2].strip()
    blob = base64.b64decode(encoded)
    for i in range(len(blob)):  # every byte of the key hash and of the signature
        changed = base64.b64encode(blob[:i] + bytes([blob[i] ^ 0x20]) + blob[i + 1 :]).decode()
        tampered.append(v.PETER_NOTE.replace(encoded, changed))
    for note in tampered:
        with pytest.raises(NoteError):
            tlog.open_note(note, PETER, [PETER_KEY])
    with pytest.raises(NoteError):
        tlog.open_note(v.PETER_NOTE, PETER, [ENOCH_KEY])  # key
    with pytest.raises(NoteError):
        tlog.open_note(v.PETER_NOTE, ENOCH, [PETER_KEY])  # name
    with pytest.raises(NoteError):
        tlog.open_note(v.PETER_NOTE, "PeterNeumann ", [PETER_KEY])


def test_a_note_signed_with_a_key_of_our_own_verifies_with_it_and_not_another() -> None:
    name = "tradeguard.local/audit"
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    body = tlog.checkpoint_body(name, 64, ROOT_64)
    note = tlog.signed_note(body, name, raw_public(key), key.sign(body.encode()))
    assert note.startswith(body + "\n— tradeguard.local/audit ")
    assert tlog.open_note(note, name, [raw_public(key)]) == body
    assert tlog.parse_checkpoint(tlog.open_note(note, name, [raw_public(key)])) == (name, 64, ROOT_64)
    assert tlog.open_note(note, name, [raw_public(other), raw_public(key)]) == body  # a rotation's key set
    with pytest.raises(NoteError):
        tlog.open_note(note, name, [raw_public(other)])
    with pytest.raises(NoteError):
        tlog.open_note(note, "tradeguard.local/other", [raw_public(key)])
    # the same name, another key's hash but this key's signature: the hash names the key, the key must verify
    forged_line = f"— {name} {base64.b64encode(tlog.key_hash(name, raw_public(other)) + key.sign(body.encode())).decode()}\n"
    with pytest.raises(NoteError, match="does not verify"):
        tlog.open_note(body + "\n" + forged_line, name, [raw_public(other), raw_public(key)])


def test_a_note_signed_by_the_old_and_the_new_key_of_a_rotation() -> None:
    name = "tradeguard.local/audit"
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    body = tlog.checkpoint_body(name, 7, mth(0, 7))
    by_old = tlog.signed_note(body, name, raw_public(old), old.sign(body.encode()))
    by_new = tlog.signed_note(body, name, raw_public(new), new.sign(body.encode()))
    both = by_old + by_new[len(body) + 1 :]
    for keys in ([raw_public(old)], [raw_public(new)], [raw_public(new), raw_public(old)]):
        assert tlog.open_note(both, name, keys) == body


def test_signed_note_refuses_what_its_readers_would_refuse() -> None:
    name = "tradeguard.local/audit"
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    body = tlog.checkpoint_body(name, 1, HASHES[0])
    signature = key.sign(body.encode())
    for args in [
        (body, name, raw_public(other), signature),  # a signature by another key
        (body, name, raw_public(key), signature[:63]),
        (body, name, raw_public(key), key.sign(b"something else")),
        (body[:-1], name, raw_public(key), key.sign(body[:-1].encode())),  # no final newline
        ("a\x00\n", name, raw_public(key), key.sign(b"a\x00\n")),
        (body, "bad name", raw_public(key), signature),
        (body, name, raw_public(key)[:31], signature),
    ]:
        with pytest.raises(NoteError):
            tlog.signed_note(*args)


BODIES = st.text(st.characters(codec="utf-8", blacklist_categories=["Cc", "Cs"]) | st.just("\n")).map(
    lambda s: s + "\n"
)
PRIVATE = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@SETTINGS
@given(body=BODIES, name=NAMES)
def test_any_body_round_trips_through_a_note(body: str, name: str) -> None:
    note = tlog.signed_note(body, name, raw_public(PRIVATE), PRIVATE.sign(body.encode()))
    assert tlog.open_note(note, name, [raw_public(PRIVATE)]) == body


@SETTINGS
@given(note=st.text(), name=NAMES)
def test_garbage_raises_nothing_but_note_error(note: str, name: str) -> None:
    with pytest.raises(NoteError):
        tlog.open_note(note, name, [raw_public(PRIVATE), PETER_KEY])


@SETTINGS
@given(position=st.integers(0, 400), text=st.text(max_size=3), remove=st.integers(0, 3))
def test_a_mangled_note_opens_to_its_signed_body_or_not_at_all(position: int, text: str, remove: int) -> None:
    position %= len(v.PETER_NOTE) + 1
    mangled = v.PETER_NOTE[:position] + text + v.PETER_NOTE[position + remove :]
    try:
        body = tlog.open_note(mangled, PETER, [PETER_KEY])
    except NoteError:
        return
    assert body == v.NOTE_TEXT  # e.g. stray bits in the base64 padding, or a signature line of someone else
