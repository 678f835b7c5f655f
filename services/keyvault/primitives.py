"""The only module of Tradeguard that touches `cryptography.hazmat`.

AES-256-GCM (96-bit nonces, 128-bit tags), HMAC-SHA256, Ed25519, HKDF-SHA256 and scrypt. Nothing here chooses
randomness: nonces, keys and salts are passed in, so that callers inject their random source. Every
authentication failure is `IntegrityError`, whatever the cause.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "ED25519_SEED_LEN",
    "KEY_LEN",
    "NONCE_LEN",
    "TAG_LEN",
    "Aead",
    "Ed25519Signer",
    "HmacKey",
    "IntegrityError",
    "aes_gcm_open",
    "aes_gcm_seal",
    "ed25519_verify",
    "hkdf_sha256",
    "hmac_sha256",
    "scrypt_derive",
]

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
ED25519_SEED_LEN = 32
ED25519_SIGNATURE_LEN = 64


class IntegrityError(Exception):
    """Authentication failed (wrong key, nonce, associated data, or altered bytes)."""


def _check_len(what: str, value: bytes, length: int) -> None:
    if len(value) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(value)}")


class Aead:
    """AES-256-GCM under one key; `seal` returns ciphertext || 16-byte tag."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        _check_len("AES-256 key", key, KEY_LEN)
        self._aead = AESGCM(key)

    def seal(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        _check_len("nonce", nonce, NONCE_LEN)
        return self._aead.encrypt(nonce, plaintext, associated_data)

    def open(self, nonce: bytes, sealed: bytes, associated_data: bytes) -> bytes:
        if len(nonce) != NONCE_LEN or len(sealed) < TAG_LEN:
            raise IntegrityError
        try:
            return self._aead.decrypt(nonce, sealed, associated_data)
        except InvalidTag:
            raise IntegrityError from None


def aes_gcm_seal(key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    return Aead(key).seal(nonce, plaintext, associated_data)


def aes_gcm_open(key: bytes, nonce: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    return Aead(key).open(nonce, sealed, associated_data)


class HmacKey:
    """HMAC-SHA256 under one key (any length of at least 32 bytes)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < KEY_LEN:
            raise ValueError("HMAC key must be at least 32 bytes")
        self._key = bytes(key)

    def mac(self, data: bytes) -> bytes:
        return _hmac.digest(self._key, data, hashlib.sha256)

    def verify(self, data: bytes, mac: bytes) -> bool:
        return _hmac.compare_digest(self.mac(data), mac)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 with a key of any length (for known-answer tests)."""
    return _hmac.digest(key, data, hashlib.sha256)


class Ed25519Signer:
    """An Ed25519 private key from its 32-byte seed."""

    __slots__ = ("_key", "public_key")

    def __init__(self, seed: bytes) -> None:
        _check_len("Ed25519 seed", seed, ED25519_SEED_LEN)
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(public_key) != 32 or len(signature) != ED25519_SIGNATURE_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def hkdf_sha256(ikm: bytes, info: bytes, *, salt: bytes | None = None, length: int = KEY_LEN) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def scrypt_derive(
    passphrase: bytes, salt: bytes, *, n: int = 2**15, r: int = 8, p: int = 1, length: int = KEY_LEN
) -> bytes:
    """scrypt (RFC 7914); n = 2**15, r = 8, p = 1 costs about 32 MiB and 0.1 s."""
    return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(passphrase)
