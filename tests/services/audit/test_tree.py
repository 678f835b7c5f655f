"""services/audit/tree.py against RFC 6962/9162: the published test vectors, and for every tree size up to 40 a
naive recomputation written here from the RFC's recursive definitions (MTH, PATH, SUBPROOF) and the RFC's own
verification algorithms (§2.1.3.2, §2.1.4.2), which share no code with the module."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import pytest

from services.audit import tree
from services.audit.model import Node
from tradeguard.audit import tlog

MAX_SIZE = 40

# RFC 6962 test vectors (the Certificate Transparency reference leaves; transparency-dev/merkle testonly).
VECTOR_INPUTS = [
    bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657")
] + [bytes.fromhex("606162636465666768696a6b6c6d6e6f")]
VECTOR_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
VECTOR_INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
VECTOR_CONSISTENCY = [
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip


# --- the naive reference, straight from the RFC ------------------------------------------------------------------
def leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def interior(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = split(len(leaves))
    return interior(mth(leaves[:k]), mth(leaves[k:]))


def path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = split(n)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [mth(leaves)]
    k = split(n)
    if m <= k:
        return [*subproof(m, leaves[:k], complete), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = interior(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = interior(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> bool:
    """RFC 9162 §2.1.4.2 (0 < size1 < size2)."""
    if not proof:
        return False
    items = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: first_hash is the first tree's root
        items = [root1, *items]
    fn, sn = size1 - 1, size2 - 1
    while fn % 2 == 1:
        fn >>= 1
        sn >>= 1
    fr = sr = items[0]
    for c in items[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr = interior(c, fr)
            sr = interior(c, sr)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = interior(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == root1 and sr == root2 and sn == 0


def all_subtrees(leaves: Sequence[bytes]) -> dict[tuple[int, int], bytes]:
    """Every complete aligned subtree of the tree, by brute force."""
    out: dict[tuple[int, int], bytes] = {}
    level = 0
    while (1 << level) <= len(leaves):
        width = 1 << level
        for index in range(len(leaves) // width):
            out[(level, index)] = mth(leaves[index * width : (index + 1) * width])
        level += 1
    return out


class NodeTable:
    """A store's node table in memory: counts the batched reads and the keys read."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, int], bytes] = {}
        self.calls = 0
        self.keys_read = 0

    def add(self, nodes: Sequence[Node]) -> None:
        for node in nodes:
            assert (node.level, node.index) not in self.rows, f"node {node} written twice"
            self.rows[(node.level, node.index)] = node.hash

    async def nodes(self, keys: Sequence[tuple[int, int]]) -> list[bytes]:
        self.calls += 1
        self.keys_read += len(keys)
        return [self.rows[key] for key in keys]


def build(leaves: Sequence[bytes], batch: int = 1) -> NodeTable:
    table = NodeTable()
    for start in range(0, len(leaves), batch):
        frontier = set(tree.subtree_keys(0, start))

        def lookup(level: int, index: int) -> bytes:
            assert (level, index) in frontier, "a left sibling off the right edge was read"
            return table.rows[(level, index)]

        table.add(tree.new_nodes(start, leaves[start : start + batch], lookup))
    return table


LEAVES = [leaf(i.to_bytes(2, "big") * 3) for i in range(MAX_SIZE)]


# --- the vectors ---------------------------------------------------------------------------------------------
def test_vector_roots() -> None:
    hashes = [leaf(data) for data in VECTOR_INPUTS]
    for size, expected in enumerate(VECTOR_ROOTS):
        assert mth(hashes[:size]).hex() == expected  # the reference itself is the RFC's
    assert tree.EMPTY_ROOT.hex() == VECTOR_ROOTS[0]


async def test_vector_roots_from_nodes() -> None:
    hashes = [leaf(data) for data in VECTOR_INPUTS]
    table = build(hashes)
    for size, expected in enumerate(VECTOR_ROOTS):
        assert (await tree.root_at(size, table.nodes)).hex() == expected


async def test_vector_proofs() -> None:
    table = build([leaf(data) for data in VECTOR_INPUTS])
    for index, size, proof in VECTOR_INCLUSION:
        assert [p.hex() for p in await tree.inclusion_proof(index, size, table.nodes)] == proof
    for size1, size2, proof in VECTOR_CONSISTENCY:
        assert [p.hex() for p in await tree.consistency_proof(size1, size2, table.nodes)] == proof


# --- every size up to MAX_SIZE ---------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2, 3, 7, 16, MAX_SIZE])
def test_new_nodes_are_every_complete_subtree(batch: int) -> None:
    for size in range(MAX_SIZE + 1):
        assert build(LEAVES[:size], batch).rows == all_subtrees(LEAVES[:size])


def test_new_nodes_order_and_levels() -> None:
    rows = build(LEAVES[:3]).rows
    created = tree.new_nodes(3, LEAVES[3:5], lambda level, index: rows[(level, index)])
    assert [(n.level, n.index) for n in created] == [(0, 3), (1, 1), (2, 0), (0, 4)]
    assert created[2].hash == mth(LEAVES[:4])
    assert tree.new_nodes(5, [], lambda level, index: b"") == []
    with pytest.raises(ValueError, match="size"):
        tree.new_nodes(-1, LEAVES[:1], lambda level, index: b"")


@pytest.mark.parametrize("batch", [1, 3, 7, 16])
def test_grow_waits_with_every_node_of_the_new_right_edge_it_created(batch: int) -> None:
    table = NodeTable()
    for start in range(0, MAX_SIZE, batch):
        added = LEAVES[start : start + batch]
        rows, waiting = tree.grow(start, added, lambda level, index: table.rows[(level, index)])
        assert [Node(*row) for row in rows] == tree.new_nodes(
            start, added, lambda level, index: table.rows[(level, index)]
        )
        table.add([Node(*row) for row in rows])
        end = start + len(added)
        edge = all_subtrees(LEAVES[:end])
        for level, index in tree.subtree_keys(0, end):
            if (index + 1) << level > start:  # completed by this batch
                assert waiting[level] == edge[(level, index)]


def test_new_nodes_missing_sibling_raises() -> None:
    def lookup(level: int, index: int) -> bytes:
        raise KeyError((level, index))

    with pytest.raises(KeyError):
        tree.new_nodes(1, LEAVES[1:2], lookup)


async def test_roots_for_every_size() -> None:
    table = build(LEAVES)
    for size in range(MAX_SIZE + 1):
        table.calls = 0
        assert await tree.root_at(size, table.nodes) == mth(LEAVES[:size])
        assert table.calls == (1 if size else 0)


async def test_inclusion_proofs_for_every_leaf_and_size() -> None:
    table = build(LEAVES)
    for size in range(1, MAX_SIZE + 1):
        root = mth(LEAVES[:size])
        for index in range(size):
            table.calls = table.keys_read = 0
            proof = await tree.inclusion_proof(index, size, table.nodes)
            assert proof == path(index, LEAVES[:size])
            assert verify_inclusion(LEAVES[index], index, size, proof, root)
            assert not verify_inclusion(LEAVES[(index + 1) % size], index, size, proof, root) or size == 1
            assert table.calls == (1 if proof else 0)
            assert table.keys_read <= 2 * size.bit_length()  # O(log n) reads


async def test_consistency_proofs_for_every_pair_of_sizes() -> None:
    table = build(LEAVES)
    for size2 in range(1, MAX_SIZE + 1):
        root2 = mth(LEAVES[:size2])
        for size1 in range(1, size2):
            table.calls = table.keys_read = 0
            proof = await tree.consistency_proof(size1, size2, table.nodes)
            assert proof == subproof(size1, LEAVES[:size2], True)
            assert verify_consistency(size1, size2, proof, mth(LEAVES[:size1]), root2)
            assert not verify_consistency(size1, size2, proof, mth(LEAVES[1 : size1 + 1]), root2)
            assert table.calls == 1
            assert table.keys_read <= 2 * size2.bit_length()
        assert await tree.consistency_proof(size2, size2, table.nodes) == []
        assert await tree.consistency_proof(0, size2, table.nodes) == []


def test_subtree_keys_cover_ranges_with_complete_aligned_subtrees() -> None:
    for start in range(MAX_SIZE + 1):
        for end in range(start, MAX_SIZE + 1):
            keys = tree.subtree_keys(start, end)
            covered = [i for level, index in keys for i in range(index << level, (index + 1) << level)]
            assert covered == list(range(start, end))
            assert len(keys) <= 2 * max(1, (end - start).bit_length())
            # fewest: no two neighbours of one level that together form an aligned subtree
            for (l1, i1), (l2, i2) in itertools.pairwise(keys):
                assert not (l1 == l2 and i1 % 2 == 0 and i2 == i1 + 1)
    assert tree.subtree_keys(0, 13) == [(3, 0), (2, 2), (0, 12)]
    assert tree.subtree_keys(3, 9) == [(0, 3), (2, 1), (0, 8)]


async def test_arguments_out_of_range() -> None:
    table = build(LEAVES[:5])
    for call in (
        lambda: tree.inclusion_proof(5, 5, table.nodes),
        lambda: tree.inclusion_proof(-1, 5, table.nodes),
        lambda: tree.consistency_proof(3, 2, table.nodes),
        lambda: tree.consistency_proof(-1, 2, table.nodes),
        lambda: tree.root_at(-1, table.nodes),
    ):
        with pytest.raises(ValueError):
            await call()
    with pytest.raises(ValueError):
        tree.subtree_keys(3, 2)


async def test_a_size_beyond_the_stored_nodes_raises_key_error() -> None:
    table = build(LEAVES[:5])
    with pytest.raises(KeyError):
        await tree.root_at(6, table.nodes)
    with pytest.raises(KeyError):
        await tree.inclusion_proof(0, 6, table.nodes)


async def test_proofs_verify_with_the_kits_verifier() -> None:
    """The service's proofs against tradeguard.audit.tlog (what clients and `audit verify` use)."""
    table = build(LEAVES)
    for size2 in range(1, MAX_SIZE + 1):
        root2 = await tree.root_at(size2, table.nodes)
        assert root2 == tlog.root(LEAVES[:size2])
        for index in range(size2):
            proof = await tree.inclusion_proof(index, size2, table.nodes)
            assert tlog.verify_inclusion(LEAVES[index], index, size2, proof, root2)
        for size1 in range(1, size2 + 1):
            proof = await tree.consistency_proof(size1, size2, table.nodes)
            assert tlog.verify_consistency(size1, size2, proof, tlog.root(LEAVES[:size1]), root2)
