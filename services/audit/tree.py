"""The audit log's Merkle tree over the store's complete-subtree hashes (pure: hashlib only).

The tree is RFC 6962/9162's: leaf hash SHA-256(0x00 ‖ entry bytes) (computed by the caller: `Pending.leaf_hash`),
node hash SHA-256(0x01 ‖ left ‖ right); MTH of n > 1 leaves splits at k, the largest power of two below n.

The store keeps the hash of every COMPLETE subtree, `Node(level, index, hash)`, covering leaves
[index · 2^level, (index + 1) · 2^level); level 0 holds the leaf hashes themselves. A complete subtree never
changes once its last leaf is appended, so these rows are written once, by INSERT, in the append's transaction:

- `new_nodes(size, leaf_hashes, lookup)`: the nodes that appending `leaf_hashes` to a tree of `size` leaves
  completes, level 0 included, in order of creation; the left siblings outside the batch (which lie on the old
  tree's right edge: the nodes of `subtree_keys(0, size)`) are read through `lookup(level, index)`. `grow` is
  the same as plain (level, index, hash) rows, with the new right edge's nodes that the batch created.
- `subtree_keys(start, end)`: [start, end) as the fewest complete aligned subtrees, left to right. For
  [0, size) these are the right edge ("frontier") of a tree of `size` leaves: one per set bit of `size`.
- `root_at(size, nodes)`, `inclusion_proof(index, size, nodes)`, `consistency_proof(size1, size2, nodes)`: RFC
  9162 §2.1.1 MTH, §2.1.3.1 PATH and §2.1.4.1 SUBPROOF, each hash of the answer a range hash MTH(D[a:b]) computed
  from the stored nodes alone: [a, b) is a complete subtree or a right-edge range of O(log n) complete ones. A
  proof needs O(log n) nodes, read in ONE `nodes(keys)` call (the store's batched read; it raises `KeyError` for
  a node it does not have, i.e. a size beyond the log). Arguments out of range raise `ValueError`.

Conventions where the RFC is silent: the root of the empty tree is SHA-256 of nothing; the consistency proof
from size 0 or to the same size is empty (nothing to prove).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from services.audit.model import Node

__all__ = [
    "EMPTY_ROOT",
    "NodeReader",
    "consistency_proof",
    "grow",
    "inclusion_proof",
    "new_nodes",
    "node_hash",
    "root_at",
    "subtree_keys",
]

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

NodeReader = Callable[[Sequence[tuple[int, int]]], Awaitable[list[bytes]]]
"""The store's `nodes(keys)`: the hashes of complete subtrees (level, index), in order; KeyError if missing."""


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def grow(
    size: int, leaf_hashes: Sequence[bytes], lookup: Callable[[int, int], bytes]
) -> tuple[list[tuple[int, int, bytes]], dict[int, bytes]]:
    """`new_nodes` as (level, index, hash) rows, and the last node it created at each level that still awaits
    its right sibling (level → hash): every node of the new right edge that the batch created is there (a node of
    the right edge is a left child — even index — whose sibling does not exist yet). The append path's form:
    plain tuples, one dict entry per level."""
    if size < 0:
        raise ValueError(f"size must not be negative, not {size}")
    rows: list[tuple[int, int, bytes]] = []
    add = rows.append
    waiting: dict[int, bytes] = {}  # the nodes created at each level are consecutive: the last even one waits
    for leaf_index, leaf in enumerate(leaf_hashes, start=size):
        level, index, value = 0, leaf_index, leaf
        add((0, index, value))
        while index & 1:  # a right child: its parent is complete
            sibling = waiting.pop(level, None)
            if sibling is None:  # on the old tree's right edge
                sibling = lookup(level, index - 1)
            value = node_hash(sibling, value)
            level, index = level + 1, index >> 1
            add((level, index, value))
        waiting[level] = value
    return rows, waiting


def new_nodes(size: int, leaf_hashes: Sequence[bytes], lookup: Callable[[int, int], bytes]) -> list[Node]:
    """The complete subtrees that appending `leaf_hashes` to a tree of `size` leaves creates (see the module)."""
    return [Node(level, index, value) for level, index, value in grow(size, leaf_hashes, lookup)[0]]


def subtree_keys(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) as the fewest complete aligned subtrees (level, index), left to right."""
    if not 0 <= start <= end:
        raise ValueError(f"invalid range [{start}, {end})")
    keys: list[tuple[int, int]] = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else (end - start).bit_length()
        while start + (1 << level) > end:
            level -= 1
        keys.append((level, start >> level))
        start += 1 << level
    return keys


def _split(n: int) -> int:
    """The largest power of two strictly below n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _path(m: int, a: int, b: int) -> list[tuple[int, int]]:
    """RFC 9162 PATH(m, D[a:b]) as the ranges whose MTH it lists, deepest first."""
    ranges: list[tuple[int, int]] = []
    while b - a > 1:
        k = _split(b - a)
        if m < k:
            ranges.append((a + k, b))
            b = a + k
        else:
            ranges.append((a, a + k))
            m, a = m - k, a + k
    ranges.reverse()
    return ranges


def _subproof(m: int, a: int, b: int) -> list[tuple[int, int]]:
    """RFC 9162 SUBPROOF(m, D[a:b], true) as the ranges whose MTH it lists, in the proof's order."""
    ranges: list[tuple[int, int]] = []
    start = True
    while m != b - a:
        k = _split(b - a)
        if m <= k:
            ranges.append((a + k, b))
            b = a + k
        else:
            ranges.append((a, a + k))
            m, a, start = m - k, a + k, False
    if not start:
        ranges.append((a, b))
    ranges.reverse()
    return ranges


async def _range_hashes(ranges: Sequence[tuple[int, int]], nodes: NodeReader) -> list[bytes]:
    """MTH(D[a:b]) for each range (each one's start aligned to a power of two at least its length), from one
    batched read of the complete subtrees they decompose into."""
    parts = [subtree_keys(a, b) for a, b in ranges]
    keys = list(dict.fromkeys(key for part in parts for key in part))
    if not keys:
        return []
    values = await nodes(keys)
    if len(values) != len(keys):
        raise ValueError(f"the store answered {len(values)} nodes for {len(keys)} keys")
    found = dict(zip(keys, values, strict=True))
    hashes: list[bytes] = []
    for part in parts:
        value = found[part[-1]]
        # MTH splits at the largest power of two: fold the left parts in, right to left
        for key in reversed(part[:-1]):
            value = node_hash(found[key], value)
        hashes.append(value)
    return hashes


async def root_at(size: int, nodes: NodeReader) -> bytes:
    """MTH of the first `size` leaves."""
    if size < 0:
        raise ValueError(f"size must not be negative, not {size}")
    if size == 0:
        return EMPTY_ROOT
    return (await _range_hashes([(0, size)], nodes))[0]


async def inclusion_proof(index: int, size: int, nodes: NodeReader) -> list[bytes]:
    """RFC 9162 PATH(index, D[0:size]): the audit path of leaf `index` in the tree of `size` leaves."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    return await _range_hashes(_path(index, 0, size), nodes)


async def consistency_proof(size1: int, size2: int, nodes: NodeReader) -> list[bytes]:
    """RFC 9162 PROOF(size1, D[0:size2]) = SUBPROOF(size1, D[0:size2], true); empty for size1 0 or size2."""
    if not 0 <= size1 <= size2:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    if size1 in (0, size2):
        return []
    return await _range_hashes(_subproof(size1, 0, size2), nodes)
