"""The root of trust: what wraps the key ring's material (and the secret store's data keys) at rest.

- `LocalSealedRoot`: a random 256-bit root key, sealed on disk with AES-256-GCM under a key derived from a
  passphrase by scrypt. The wrapping key is HKDF(root, "keyring-wrap").
- `Pkcs11Root`: an AES-256 key inside a PKCS#11 token (SoftHSM2 in the tests), created if absent with
  CKA_SENSITIVE and not CKA_EXTRACTABLE; wrapping is CKM_AES_GCM inside the token, so the key never leaves it.

Wrapped blobs are `kind (1 byte) || nonce (12) || ciphertext || tag (16)`; the caller's associated data binds a
blob to what it wraps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from services.keyvault import primitives
from services.keyvault.keyring import b64url_decode, b64url_encode
from tradeguard.files import atomic_write

__all__ = [
    "ROOT_CHECK_META",
    "LocalSealedRoot",
    "Pkcs11Root",
    "RootKey",
    "RootUnwrapError",
    "WrongPassphrase",
    "matches_root_check",
    "root_check",
]

_LOCAL_KIND = b"\x01"
_PKCS11_KIND = b"\x02"
_SEAL_AD = b"tradeguard/keyvault/sealed-root/v1"
_WRAP_INFO = b"tradeguard/keyvault/keyring-wrap/v1"
_FINGERPRINT_INFO = b"tradeguard/keyvault/root-fingerprint/v1"
_PIN_CHECK_N = 2**14  # scrypt cost of the in-memory check of a PKCS#11 PIN


ROOT_CHECK_META = "root_check"  # the store's meta entry: a known value wrapped by the ring's root key
_ROOT_CHECK_AD = b"tradeguard/keyvault/root-check/v1"
_ROOT_CHECK = b"the root key of this key ring"


def root_check(root: RootKey) -> bytes:
    """What the store keeps to recognise `root` later (a known value wrapped under it)."""
    return root.wrap(_ROOT_CHECK, _ROOT_CHECK_AD)


def matches_root_check(root: RootKey, check: bytes) -> bool:
    """Whether `root` is the root key that wrote `check`."""
    try:
        return root.unwrap(check, _ROOT_CHECK_AD) == _ROOT_CHECK
    except RootUnwrapError:
        return False


class RootUnwrapError(Exception):
    """A wrapped blob did not authenticate under this root key."""


class WrongPassphrase(Exception):
    """The passphrase (or PIN) does not open the root key."""


class RootKey(Protocol):
    kind: str

    def wrap(self, plaintext: bytes, associated_data: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, associated_data: bytes) -> bytes: ...

    def accepts(self, secret: str) -> bool:
        """Whether `secret` (a passphrase or PIN) opens this root key. Blocking (a KDF): off the event loop."""
        ...

    def close(self) -> None: ...


def _seal(root: bytes, passphrase: str, random: Callable[[int], bytes], scrypt_n: int) -> dict[str, Any]:
    """The sealed-root document: `root` under AES-256-GCM with a key scrypt derives from `passphrase`."""
    salt, nonce = random(16), random(primitives.NONCE_LEN)
    kek = primitives.scrypt_derive(passphrase.encode(), salt, n=scrypt_n)
    return {
        "format": "tradeguard-sealed-root/v1",
        "kdf": {"name": "scrypt", "n": scrypt_n, "r": 8, "p": 1, "salt": b64url_encode(salt)},
        "nonce": b64url_encode(nonce),
        "sealed": b64url_encode(primitives.aes_gcm_seal(kek, nonce, root, _SEAL_AD)),
    }


class LocalSealedRoot:
    kind = "local"

    def __init__(self, root: bytes, random: Callable[[int], bytes], path: Path | None = None) -> None:
        self._aead = primitives.Aead(primitives.hkdf_sha256(root, _WRAP_INFO))
        self._random = random
        self._path = path  # the sealed file it came from: `accepts` asks it
        self._fingerprint = hashlib.sha256(_FINGERPRINT_INFO + root).digest()

    @staticmethod
    def exists(path: Path) -> bool:
        return path.exists()

    @classmethod
    def create(
        cls,
        path: Path,
        passphrase: str,
        random: Callable[[int], bytes] = os.urandom,
        *,
        scrypt_n: int = 2**15,
    ) -> LocalSealedRoot:
        """A new random root key sealed at `path` (which must not exist yet)."""
        if not passphrase:
            raise WrongPassphrase("an empty passphrase cannot seal the vault")
        root = random(primitives.KEY_LEN)
        document = _seal(root, passphrase, random, scrypt_n)
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never overwrite a sealed root (that would lose every key).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(document, out)
            out.flush()
            os.fsync(out.fileno())
        return cls(root, random, path)

    @classmethod
    def change_passphrase(
        cls,
        path: Path,
        old: str,
        new: str,
        random: Callable[[int], bytes] = os.urandom,
        *,
        scrypt_n: int = 2**15,
    ) -> None:
        """Seal the same root key under `new` (fresh salt and nonce); `old` must unseal it first.

        The root key does not change, so nothing wrapped under it does either, and a running vault is not
        affected. The file is replaced atomically: a crash leaves the old or the new sealing, never neither."""
        if not new:
            raise WrongPassphrase("an empty passphrase cannot seal the vault")
        root = cls._open(path, old)
        document = _seal(root, new, random, scrypt_n)
        atomic_write(path, json.dumps(document).encode(), 0o600)

    @classmethod
    def unseal(
        cls, path: Path, passphrase: str, random: Callable[[int], bytes] = os.urandom
    ) -> LocalSealedRoot:
        return cls(cls._open(path, passphrase), random, path)

    def accepts(self, secret: str) -> bool:
        """Whether `secret` is the passphrase the sealed file holds this root key under now (after a
        change-passphrase, the new one)."""
        if self._path is None:
            return False
        try:
            root = self._open(self._path, secret)
        except WrongPassphrase:
            return False
        return hmac.compare_digest(hashlib.sha256(_FINGERPRINT_INFO + root).digest(), self._fingerprint)

    @staticmethod
    def _open(path: Path, passphrase: str) -> bytes:
        document: dict[str, Any] = json.loads(path.read_text())
        if document.get("format") != "tradeguard-sealed-root/v1":
            raise ValueError(f"{path} is not a sealed Tradeguard root key")
        kdf = document["kdf"]
        salt = b64url_decode(str(kdf["salt"]))
        nonce = b64url_decode(str(document["nonce"]))
        sealed = b64url_decode(str(document["sealed"]))
        if salt is None or nonce is None or sealed is None or kdf.get("name") != "scrypt":
            raise ValueError(f"{path} is damaged")
        kek = primitives.scrypt_derive(
            passphrase.encode(), salt, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])
        )
        try:
            return primitives.aes_gcm_open(kek, nonce, sealed, _SEAL_AD)
        except primitives.IntegrityError:
            raise WrongPassphrase("the passphrase does not unseal the root key") from None

    def wrap(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = self._random(primitives.NONCE_LEN)
        return _LOCAL_KIND + nonce + self._aead.seal(nonce, plaintext, associated_data)

    def unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
        if blob[:1] != _LOCAL_KIND:
            raise RootUnwrapError("not wrapped by a local root key")
        nonce, sealed = blob[1 : 1 + primitives.NONCE_LEN], blob[1 + primitives.NONCE_LEN :]
        try:
            return self._aead.open(nonce, sealed, associated_data)
        except primitives.IntegrityError:
            raise RootUnwrapError("wrapped material does not authenticate") from None

    def close(self) -> None:
        """Nothing to release (Python cannot reliably wipe the key bytes)."""


class Pkcs11Root:
    """An AES-256 key held by a PKCS#11 token; every wrap and unwrap is a C_Encrypt / C_Decrypt in the token."""

    kind = "pkcs11"

    def __init__(self, session: Any, key: Any, random: Callable[[int], bytes], pin: str = "") -> None:
        self._session = session
        self._key = key
        self._random = random
        self._lock = threading.Lock()  # one PKCS#11 session: one operation at a time
        self._closed = False
        # The token cannot check a PIN while this process is logged in to it (C_Login: already logged in), so
        # the PIN that opened it is remembered as a salted scrypt digest, for `accepts`.
        self._pin_salt = random(16)
        self._pin_check = self._pin_digest(pin) if pin else b""

    def _pin_digest(self, pin: str) -> bytes:
        return primitives.scrypt_derive(pin.encode(), self._pin_salt, n=_PIN_CHECK_N)

    def accepts(self, secret: str) -> bool:
        """Whether `secret` is the PIN this root was opened with."""
        return bool(self._pin_check) and hmac.compare_digest(self._pin_digest(secret), self._pin_check)

    @classmethod
    def open(
        cls,
        module: str,
        token_label: str,
        pin: str,
        key_label: str,
        random: Callable[[int], bytes] = os.urandom,
        *,
        create: bool = True,
    ) -> Pkcs11Root:
        """Log in to the token and find the key by label, generating it (in the token) if absent and `create`;
        without `create`, a missing key is a ValueError."""
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.exceptions import NoSuchKey, PinIncorrect, PinLenRange

        library = pkcs11.lib(module)
        token = library.get_token(token_label=token_label)
        try:
            session = token.open(rw=True, user_pin=pin)
        except (PinIncorrect, PinLenRange):
            raise WrongPassphrase("the PIN does not open the token") from None
        try:
            try:
                key = session.get_key(
                    label=key_label, key_type=KeyType.AES, object_class=ObjectClass.SECRET_KEY
                )
            except NoSuchKey:
                if not create:
                    raise ValueError(f"token {token_label!r} holds no key {key_label!r}") from None
                key = session.generate_key(
                    KeyType.AES,
                    256,
                    label=key_label,
                    store=True,
                    template={
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.ENCRYPT: True,
                        Attribute.DECRYPT: True,
                        Attribute.WRAP: True,
                        Attribute.UNWRAP: True,
                    },
                )
            if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
                raise ValueError(
                    f"token key {key_label!r} is extractable or not sensitive; refusing to use it"
                )
        except BaseException:
            session.close()
            raise
        return cls(session, key, random, pin)

    def _mechanism(self, nonce: bytes, associated_data: bytes) -> tuple[Any, Any]:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        return Mechanism.AES_GCM, GCMParams(nonce, associated_data or None, primitives.TAG_LEN * 8)

    def wrap(self, plaintext: bytes, associated_data: bytes) -> bytes:
        nonce = self._random(primitives.NONCE_LEN)
        mechanism, param = self._mechanism(nonce, associated_data)
        with self._lock:
            sealed = self._key.encrypt(plaintext, mechanism=mechanism, mechanism_param=param)
        return _PKCS11_KIND + nonce + bytes(sealed)

    def unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
        from pkcs11.exceptions import PKCS11Error

        if blob[:1] != _PKCS11_KIND or len(blob) < 1 + primitives.NONCE_LEN + primitives.TAG_LEN:
            raise RootUnwrapError("not wrapped by a PKCS#11 root key")
        nonce, sealed = blob[1 : 1 + primitives.NONCE_LEN], blob[1 + primitives.NONCE_LEN :]
        mechanism, param = self._mechanism(nonce, associated_data)
        try:
            with self._lock:
                return bytes(self._key.decrypt(sealed, mechanism=mechanism, mechanism_param=param))
        except PKCS11Error:
            raise RootUnwrapError("wrapped material does not authenticate") from None

    def close(self) -> None:
        """Close the session (once: closing again is a no-op)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._session.close()
