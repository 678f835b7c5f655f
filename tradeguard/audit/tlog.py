"""The audit log's transparency-log primitives: RFC 6962/9162 Merkle hashing and proofs, C2SP checkpoints and
C2SP signed notes (Ed25519). Pure: hashlib, base64 and cryptography's Ed25519 *verification*; no I/O, no signing.

Hashing (RFC 6962 section 2.1, RFC 9162 section 2.1.1), SHA-256 throughout:

    leaf_hash(entry)  = SHA-256(0x00 || entry)
    node_hash(l, r)   = SHA-256(0x01 || l || r)
    root([])          = EMPTY_ROOT = SHA-256("")
    root(hashes)      = the Merkle tree hash over leaf hashes: for n > 1 leaves, with k the largest power of two
                        below n, node_hash(root(hashes[:k]), root(hashes[k:])); one leaf: its hash

`CompactRange` computes the same root incrementally in O(log n) memory (one hash per set bit of the size), so a
verifier can stream millions of entries.

Proofs: `verify_inclusion` (RFC 9162 2.1.3.2) and `verify_consistency` (RFC 9162 2.1.4.2) return True or False and
never raise on bad values: every hash must be exactly 32 `bytes`, sizes and indices non-negative ints (not bool)
below 2**63, and proofs no longer than a tree of that size can need. Edge cases (outside the RFC's 0 < m < n):
a consistency proof from size m to the same size is empty and the roots are equal; from size 0 it is empty and
root1 is EMPTY_ROOT (every tree extends the empty tree; root2 is not checked). A proof's (size, root) pair must come
from one signed checkpoint: the RFC algorithms read only the tree's shape from the size, so a proof can also verify
under another size of the same shape with the same root, which no other checkpoint carries.

Checkpoints (https://c2sp.org/tlog-checkpoint): the note body "<origin>\\n<size>\\n<base64 root>\\n". The origin is a
non-empty line (`checkpoint_body` makes only key names, below, as the origin is also the signer's name); the size
ASCII decimal without sign or leading zeros (0 is "0"); the root the standard padded base64 of exactly 32 bytes,
canonical. `parse_checkpoint` accepts and ignores extension lines after the third (each non-empty, as the spec
allows); it raises `CheckpointError` for anything else, and never anything else.

Signed notes (https://c2sp.org/signed-note): the body (UTF-8 text ending in a newline), a blank line, then
signature lines "— <name> <base64(key hash || signature)>\\n" (em dash U+2014, space). A key name is non-empty,
without Unicode spaces, "+" or control characters. The Ed25519 key hash is SHA-256(name || 0x0A || 0x01 ||
32-byte public key)[:4]; the signature is Ed25519 (RFC 8032) over the body bytes, newline included. A note is
valid UTF-8 with no control character but newline; the body is what precedes the last blank line.
`open_note(note, name, keys)` returns the body when at least one signature line with that name and the key hash of
one of `keys` (several during a key rotation) verifies, and no such line fails; lines of other names or unknown key
hashes are ignored (as the spec requires). It raises `NoteError` for a malformed note, more than MAX_SIGNATURES
signature lines, a note over MAX_NOTE_BYTES, a failing signature of a known key, or none of a known key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "MAX_TREE_SIZE",
    "CheckpointError",
    "CompactRange",
    "NoteError",
    "checkpoint_body",
    "key_hash",
    "leaf_hash",
    "node_hash",
    "open_note",
    "parse_checkpoint",
    "root",
    "signed_note",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
MAX_TREE_SIZE: Final = 2**63 - 1  # what a signed 64-bit sequence column holds
MAX_SIGNATURES: Final = 100  # the spec asks for at least 16; Go's sumdb/note caps at 100
MAX_NOTE_BYTES: Final = 1 << 20
MAX_CHECKPOINT_BYTES: Final = 1 << 16

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
_ED25519: Final = b"\x01"  # the signed-note signature type of Ed25519
_ED25519_KEY_SIZE: Final = 32
_ED25519_SIG_SIZE: Final = 64
_SIG_PREFIX: Final = "— "  # em dash U+2014, space
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]{0,18}")
_ROOT_B64_LEN: Final = 44


class CheckpointError(ValueError):
    """A checkpoint body that is not a well-formed C2SP tlog-checkpoint (or arguments that cannot make one)."""


class NoteError(ValueError):
    """A signed note that is malformed or not verified by the expected key (or arguments that cannot make one)."""


# --- hashing ---------------------------------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry): the hash of a log entry's bytes."""
    return hashlib.sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_size(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_TREE_SIZE


class CompactRange:
    """The Merkle tree hash of the leaves appended so far, in O(log n) memory: the roots of the perfect subtrees
    that the binary decomposition of `size` cuts the tree into, largest (leftmost) first."""

    __slots__ = ("_peaks", "size")

    def __init__(self) -> None:
        self.size = 0
        self._peaks: list[bytes] = []

    def append(self, leaf_hash: bytes) -> None:
        """Append one leaf by its hash (32 bytes; ValueError otherwise)."""
        if not _is_hash(leaf_hash):
            raise ValueError("a leaf hash is 32 bytes")
        if self.size >= MAX_TREE_SIZE:
            raise ValueError("the tree is full")
        node = leaf_hash
        size = self.size
        while size & 1:  # each trailing one bit is a perfect subtree of the same height to merge with
            node = node_hash(self._peaks.pop(), node)
            size >>= 1
        self._peaks.append(node)
        self.size += 1

    def root(self) -> bytes:
        """The root of the tree of `size` leaves (EMPTY_ROOT when empty)."""
        if not self._peaks:
            return EMPTY_ROOT
        node = self._peaks[-1]
        for peak in reversed(self._peaks[:-1]):
            node = node_hash(peak, node)
        return node


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The RFC 6962 Merkle tree hash over `leaf_hashes` (each 32 bytes; ValueError otherwise)."""
    compact = CompactRange()
    for hash_ in leaf_hashes:
        compact.append(hash_)
    return compact.root()


# --- proofs ----------------------------------------------------------------------------------------------


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Whether `proof` shows that the leaf hash `leaf` is at `index` in the tree of `size` leaves with `root`
    (RFC 9162 section 2.1.3.2)."""
    if not (_is_size(index) and _is_size(size) and index < size):
        return False
    if len(proof) > 64 or not (_is_hash(leaf) and _is_hash(root) and all(_is_hash(p) for p in proof)):
        return False
    fn, sn = index, size - 1
    node = leaf
    for sibling in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            node = node_hash(sibling, node)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            node = node_hash(node, sibling)
        fn >>= 1
        sn >>= 1
    return sn == 0 and node == root


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> bool:
    """Whether `proof` shows that the tree of `size2` leaves with `root2` extends the tree of `size1` leaves with
    `root1` (RFC 9162 section 2.1.4.2; the edge cases as the module docstring states)."""
    if not (_is_size(size1) and _is_size(size2) and size1 <= size2):
        return False
    if len(proof) > 128 or not (_is_hash(root1) and _is_hash(root2) and all(_is_hash(p) for p in proof)):
        return False
    if size1 == 0:
        return not proof and root1 == EMPTY_ROOT and (size2 != 0 or root2 == EMPTY_ROOT)
    if size1 == size2:
        return not proof and root1 == root2
    if not proof:
        return False
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # a power of two: the old tree is a complete subtree of the new one
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    first = second = path[0]
    for node in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            first = node_hash(node, first)
            second = node_hash(node, second)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            second = node_hash(second, node)
        fn >>= 1
        sn >>= 1
    return sn == 0 and first == root1 and second == root2


# --- checkpoints -----------------------------------------------------------------------------------------


def _is_text(text: str) -> bool:
    """Valid UTF-8 (no lone surrogates) with no control character but newline."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ch < " " and ch != "\n" for ch in text)


def _is_name(name: object) -> bool:
    """A signed-note key name: non-empty, no Unicode space, no "+", no control character, valid UTF-8."""
    return (
        isinstance(name, str)
        and name != ""
        and "+" not in name
        and not any(ch.isspace() or ch < " " for ch in name)
        and _is_text(name)
    )


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    """The C2SP tlog-checkpoint note body "<origin>\\n<size>\\n<base64 root>\\n" (CheckpointError for an origin
    that is not a key name, a size out of range or a root that is not 32 bytes)."""
    if not _is_name(origin):
        raise CheckpointError("origin: a non-empty name without spaces, '+' or control characters")
    if not _is_size(size):
        raise CheckpointError(f"size: an integer from 0 to {MAX_TREE_SIZE}")
    if not _is_hash(root):
        raise CheckpointError("root: 32 bytes")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode('ascii')}\n"


def parse_checkpoint(body: str) -> tuple[str, int, bytes]:
    """(origin, size, root) of a C2SP tlog-checkpoint note body; extension lines are accepted and ignored.
    Raises CheckpointError (only) for anything malformed."""
    if not isinstance(body, str) or len(body) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError("checkpoint: not text of a checkpoint's size")
    if not body.endswith("\n") or not _is_text(body):
        raise CheckpointError("checkpoint: UTF-8 lines without control characters, each ending in a newline")
    lines = body[:-1].split("\n")
    if len(lines) < 3 or any(line == "" for line in lines):
        raise CheckpointError("checkpoint: at least three non-empty lines")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not _DECIMAL.fullmatch(size_text) or int(size_text) > MAX_TREE_SIZE:
        raise CheckpointError(
            f"checkpoint size: decimal without sign or leading zeros, at most {MAX_TREE_SIZE}"
        )
    if len(root_text) != _ROOT_B64_LEN:
        raise CheckpointError("checkpoint root: base64 of 32 bytes")
    try:
        root_hash = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError("checkpoint root: base64 of 32 bytes") from None
    if len(root_hash) != HASH_SIZE or base64.b64encode(root_hash).decode("ascii") != root_text:
        raise CheckpointError("checkpoint root: canonical base64 of 32 bytes")
    return origin, int(size_text), root_hash


# --- signed notes ----------------------------------------------------------------------------------------


def key_hash(name: str, public_key: bytes) -> bytes:
    """The 4-byte key hash of an Ed25519 signed-note key: SHA-256(name || 0x0A || 0x01 || public key)[:4]
    (NoteError for a name that is not a key name or a key that is not 32 bytes)."""
    if not _is_name(name):
        raise NoteError("key name: non-empty, without spaces, '+' or control characters")
    if not isinstance(public_key, bytes) or len(public_key) != _ED25519_KEY_SIZE:
        raise NoteError("public key: 32 bytes (Ed25519)")
    return hashlib.sha256(name.encode("utf-8") + b"\n" + _ED25519 + public_key).digest()[:4]


def _ed25519_verifies(public_key: bytes, signature: bytes, message: bytes) -> bool:
    if len(signature) != _ED25519_SIG_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True


def _check_body(body: str) -> None:
    if not isinstance(body, str) or not body.endswith("\n") or not _is_text(body):
        raise NoteError("note body: UTF-8 text without control characters, ending in a newline")


def signed_note(body: str, name: str, public_key: bytes, signature: bytes) -> str:
    """The signed note of `body` with one Ed25519 signature line by `name`. The signature (64 bytes, made by the
    key vault) must verify over the body with `public_key`: NoteError otherwise, so that no note is published
    that its readers would refuse."""
    _check_body(body)
    hash_ = key_hash(name, public_key)
    if not isinstance(signature, bytes) or not _ed25519_verifies(public_key, signature, body.encode("utf-8")):
        raise NoteError("signature: does not verify over the body with the public key")
    if len(body.encode("utf-8")) > MAX_NOTE_BYTES - 256:
        raise NoteError("note body: too long")
    line = base64.b64encode(hash_ + signature).decode("ascii")
    return f"{body}\n{_SIG_PREFIX}{name} {line}\n"


def _signature_lines(text: str) -> list[tuple[str, bytes, bytes]]:
    """(name, key hash, signature) of each signature line (the text after the blank line); NoteError if any line
    is malformed or there are more than MAX_SIGNATURES."""
    if not text.endswith("\n"):
        raise NoteError("note: a signature line does not end in a newline")
    lines = text[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note: more than {MAX_SIGNATURES} signatures")
    parsed = []
    for line in lines:
        if not line.startswith(_SIG_PREFIX):
            raise NoteError("note: a signature line does not start with an em dash and a space")
        name, space, encoded = line[len(_SIG_PREFIX) :].partition(" ")
        if not space or not _is_name(name) or encoded == "":
            raise NoteError("note: a signature line without a key name and a signature")
        try:
            blob = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise NoteError("note: a signature that is not base64") from None
        if len(blob) < 5:
            raise NoteError("note: a signature shorter than a key hash and one byte")
        parsed.append((name, blob[:4], blob[4:]))
    return parsed


def open_note(note: str, name: str, public_keys: Sequence[bytes]) -> str:
    """The body of `note` once verified: signed by `name` with one of `public_keys` (raw 32-byte Ed25519 keys),
    as the module docstring states; NoteError otherwise."""
    if not isinstance(note, str) or len(note) > MAX_NOTE_BYTES:
        raise NoteError("note: not text of a note's size")
    if not _is_text(note):
        raise NoteError("note: not UTF-8 text without control characters")
    if len(note.encode("utf-8")) > MAX_NOTE_BYTES:
        raise NoteError("note: too long")
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("note: no blank line before the signatures")
    body, signatures = note[: split + 1], _signature_lines(note[split + 2 :])
    keys: dict[bytes, list[bytes]] = {}
    for public_key in public_keys:
        keys.setdefault(key_hash(name, public_key), []).append(public_key)
    message = body.encode("utf-8")
    verified = False
    for signer, hash_, signature in signatures:
        if signer != name or hash_ not in keys:
            continue  # another signer's, or a key we do not know: ignored, as the spec requires
        if not any(_ed25519_verifies(key, signature, message) for key in keys[hash_]):
            raise NoteError(f"note: a signature by {name} does not verify")
        verified = True
    if not verified:
        raise NoteError(f"note: no signature by {name} with a known key")
    return body
