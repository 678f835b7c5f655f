"""Named keys and their versions, and the self-describing ciphertext format. Pure: no I/O, no clock, no RNG.

A ciphertext (and a signature, and an HMAC) is `tgv1:<key-name>:v<version>:<base64url(body)>`, the body of a
ciphertext being nonce (12) || ciphertext || tag (16). The prefix `tgv1:<key-name>:v<version>:` exactly as it
appears, followed by the caller's associated data, is the AES-GCM associated data: changing any character of the
prefix, any byte of the body, or the associated data fails authentication. Every such failure, and every parse
failure, is the one opaque `DecryptionFailed`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.keyvault import primitives
from services.keyvault.errors import DecryptionFailed, InvalidArgument, key_type_mismatch
from services.keyvault.model import KeyType, StoredKey, VersionRecord

__all__ = [
    "FORMAT_PREFIX",
    "LoadedKey",
    "Token",
    "b64url_decode",
    "b64url_encode",
    "check_key_name",
    "material_ad",
    "new_material",
    "parse_token",
    "segments_violation",
]

FORMAT_PREFIX = "tgv1"
KEY_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._/-]{0,127}")
_TOKEN_RE = re.compile(r"tgv1:([a-z0-9][a-z0-9._/-]{0,127}):v([1-9][0-9]{0,9}):([A-Za-z0-9_-]*)")
MAX_VERSION = 2**31 - 1


SEGMENTS_RULE = "must not have an empty, '.' or '..' segment between '/', nor end with '/'"


def segments_violation(value: str) -> str | None:
    """Why a `/`-separated name is not a plain path (None if it is): an empty segment (`a//b`, a trailing `/`)
    or a `.` / `..` segment would let two spellings name one thing, or `a/../b` match a policy glob of `a/*`."""
    if any(segment in ("", ".", "..") for segment in value.split("/")):
        return SEGMENTS_RULE
    return None


def check_key_name(name: str, field_name: str = "key_name") -> str:
    if not KEY_NAME_RE.fullmatch(name):
        raise InvalidArgument.field(
            field_name, "must be 1-128 characters of a-z 0-9 . _ / -, starting with a letter or digit"
        )
    problem = segments_violation(name)
    if problem is not None:
        raise InvalidArgument.field(field_name, problem)
    return name


def material_ad(name: str, version: int) -> bytes:
    """Associated data binding wrapped key material to its key name and version."""
    return f"tradeguard/keyvault/key-material:{name}:v{version}".encode()


def new_material(key_type: KeyType, random: Callable[[int], bytes]) -> tuple[bytes, bytes]:
    """Fresh (secret material, public key) for a version of a key of this type."""
    if key_type is KeyType.ED25519:
        seed = random(primitives.ED25519_SEED_LEN)
        return seed, primitives.Ed25519Signer(seed).public_key
    return random(primitives.KEY_LEN), b""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes | None:
    """Strict unpadded base64url: None unless `text` is the one canonical encoding of its bytes."""
    if len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None
    return data if b64url_encode(data) == text else None


@dataclass(frozen=True)
class Token:
    """A parsed `tgv1:` string: `prefix` is exactly the text before the body, including the last colon."""

    name: str
    version: int
    prefix: str
    body: bytes


def format_token(name: str, version: int, body: bytes) -> str:
    return f"{FORMAT_PREFIX}:{name}:v{version}:{b64url_encode(body)}"


def token_prefix(name: str, version: int) -> str:
    return f"{FORMAT_PREFIX}:{name}:v{version}:"


def parse_token(text: str) -> Token | None:
    match = _TOKEN_RE.fullmatch(text)
    if match is None:
        return None
    name, version_text, body_text = match.groups()
    version = int(version_text)
    body = b64url_decode(body_text)
    if body is None or version > MAX_VERSION:
        return None
    return Token(name=name, version=version, prefix=text[: match.start(3)], body=body)


class _Version:
    """Live primitives of one key version."""

    __slots__ = ("aead", "hmac", "public_key", "record", "signer")

    def __init__(self, key_type: KeyType, record: VersionRecord, material: bytes) -> None:
        self.record = record
        self.public_key = record.public_key
        self.aead: primitives.Aead | None = None
        self.hmac: primitives.HmacKey | None = None
        self.signer: primitives.Ed25519Signer | None = None
        if key_type is KeyType.AES256_GCM:
            self.aead = primitives.Aead(material)
        elif key_type is KeyType.HMAC_SHA256:
            self.hmac = primitives.HmacKey(material)
        else:
            self.signer = primitives.Ed25519Signer(material)


class LoadedKey:
    """A key with its versions' material unwrapped in memory; immutable (rotation builds a new one)."""

    __slots__ = ("_versions", "config", "latest_version", "stored")

    def __init__(
        self, stored: StoredKey, materials: Mapping[int, bytes], previous: LoadedKey | None = None
    ) -> None:
        """`materials` holds the unwrapped material of every version not already live in `previous`."""
        self.stored = stored
        self.config = stored.config
        self._versions: dict[int, _Version] = {
            r.version: previous._versions[r.version]
            if previous is not None and previous.reusable(r)
            else _Version(stored.config.type, r, materials[r.version])
            for r in stored.versions
        }
        self.latest_version = stored.latest.version

    @property
    def name(self) -> str:
        return self.config.name

    def _require(self, key_type: KeyType, operation: str) -> None:
        if self.config.type is not key_type:
            raise key_type_mismatch(self.name, self.config.type.value, operation)

    # --- encryption -------------------------------------------------------------------------------------
    def encrypt(self, plaintext: bytes, associated_data: bytes, nonce: bytes) -> str:
        self._require(KeyType.AES256_GCM, "encrypt")
        version = self.latest_version
        aead = self._versions[version].aead
        assert aead is not None
        prefix = token_prefix(self.name, version)
        sealed = aead.seal(nonce, plaintext, prefix.encode() + associated_data)
        return prefix + b64url_encode(nonce + sealed)

    def decrypt(self, ciphertext: str, associated_data: bytes) -> tuple[bytes, int]:
        """(plaintext, version) or DecryptionFailed with the cause for the log."""
        self._require(KeyType.AES256_GCM, "decrypt")
        token = parse_token(ciphertext)
        if token is None:
            raise DecryptionFailed("malformed ciphertext")
        if token.name != self.name:
            raise DecryptionFailed("ciphertext of another key")
        version = self._versions.get(token.version)
        if version is None:
            raise DecryptionFailed(f"no version {token.version}")
        if token.version < self.config.min_decryption_version:
            raise DecryptionFailed(
                f"version {token.version} below min_decryption_version {self.config.min_decryption_version}"
            )
        assert version.aead is not None
        body = token.body
        if len(body) < primitives.NONCE_LEN + primitives.TAG_LEN:
            raise DecryptionFailed("truncated ciphertext")
        try:
            plaintext = version.aead.open(
                body[: primitives.NONCE_LEN],
                body[primitives.NONCE_LEN :],
                token.prefix.encode() + associated_data,
            )
        except primitives.IntegrityError:
            raise DecryptionFailed("authentication failed") from None
        return plaintext, token.version

    def has_version(self, version: int) -> bool:
        return version in self._versions

    def reusable(self, record: VersionRecord) -> bool:
        """Whether this key holds `record` live already: the same version with the same wrapped material (not
        merely the same number: a key deleted and created again under its name by another replica)."""
        live = self._versions.get(record.version)
        return live is not None and live.record.wrapped == record.wrapped

    # --- HMAC and signatures ------------------------------------------------------------------------------
    def hmac(self, data: bytes) -> str:
        self._require(KeyType.HMAC_SHA256, "hmac")
        version = self.latest_version
        mac = self._versions[version].hmac
        assert mac is not None
        return format_token(self.name, version, mac.mac(data))

    def sign(self, message: bytes) -> str:
        self._require(KeyType.ED25519, "sign")
        version = self.latest_version
        signer = self._versions[version].signer
        assert signer is not None
        return format_token(self.name, version, signer.sign(message))

    def verify(self, message: bytes, signature: str) -> bool:
        """An Ed25519 signature or an HMAC of this key, at a version not below min_decryption_version."""
        if self.config.type is KeyType.AES256_GCM:
            raise key_type_mismatch(self.name, self.config.type.value, "verify")
        token = parse_token(signature)
        if token is None or token.name != self.name or token.version < self.config.min_decryption_version:
            return False
        version = self._versions.get(token.version)
        if version is None:
            return False
        if version.hmac is not None:
            return version.hmac.verify(message, token.body)
        return primitives.ed25519_verify(version.public_key, message, token.body)
