"""Use of keys (key_use.py): encrypt, decrypt, tampering, batches, data keys, sign, verify, HMAC."""

from __future__ import annotations

import pytest

from services.keyvault import primitives
from services.keyvault.core import KeyVault
from services.keyvault.errors import (
    DecryptionFailed,
    FailedPrecondition,
    PermissionDenied,
)
from services.keyvault.keyring import b64url_decode, b64url_encode, parse_token
from services.keyvault.model import KeyType
from tradeguard.testing import FakeClock

from .conftest import AES, AUTH, FRESHNESS_US, OPS, TRADING, VaultFactory, decrypt_fails


async def test_encrypt_decrypt_round_trip_and_format(vault: KeyVault) -> None:
    await vault.create_key(OPS, "credentials", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"api-secret", b"user-1")
    assert ct.startswith("tgv1:credentials:v1:")
    body = b64url_decode(ct.split(":", 3)[3])
    assert body is not None and len(body) == 12 + len(b"api-secret") + 16
    assert await vault.decrypt(AUTH, "credentials", ct, b"user-1") == b"api-secret"
    # Random nonces: the same plaintext twice gives two ciphertexts.
    assert await vault.encrypt(AUTH, "credentials", b"api-secret", b"user-1") != ct
    assert await vault.decrypt(AUTH, "credentials", await vault.encrypt(AUTH, "credentials", b""), b"") == b""


async def test_tampering_with_any_character_byte_prefix_or_ad_fails_opaquely(vault: KeyVault) -> None:
    await vault.create_key(OPS, "credentials", AES)
    await vault.create_key(OPS, "credentials-other", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"0123456789abcdef", b"owner=alice")
    causes = set()
    # Every character of the whole string replaced by another of the alphabet.
    for i in range(len(ct)):
        replacement = "A" if ct[i] != "A" else "B"
        causes.add(
            (
                await decrypt_fails(vault, "credentials", ct[:i] + replacement + ct[i + 1 :], b"owner=alice")
            ).cause
        )
    # Every bit of every byte of the body (re-encoded canonically, so only the byte changes).
    prefix, body_text = ct.rsplit(":", 1)
    body = b64url_decode(body_text)
    assert body is not None
    for i in range(len(body)):
        for bit in (0x01, 0x80):
            bad = bytearray(body)
            bad[i] ^= bit
            await decrypt_fails(vault, "credentials", f"{prefix}:{b64url_encode(bytes(bad))}", b"owner=alice")
    # Truncated at every length, and extended.
    for n in range(len(ct)):
        await decrypt_fails(vault, "credentials", ct[:n], b"owner=alice")
    await decrypt_fails(vault, "credentials", ct + "A", b"owner=alice")
    await decrypt_fails(vault, "credentials", ct + "AAAA", b"owner=alice")
    # Altered associated data.
    for ad in (b"", b"owner=bob", b"owner=alice ", b"owner=alic"):
        causes.add((await decrypt_fails(vault, "credentials", ct, ad)).cause)
    # Altered prefix: format, version, another key's name (which the caller names too).
    await decrypt_fails(vault, "credentials", "tgv2" + ct[4:], b"owner=alice")
    await decrypt_fails(vault, "credentials", ct.replace(":v1:", ":v01:"), b"owner=alice")
    await vault.rotate_key(OPS, "credentials")
    await decrypt_fails(vault, "credentials", ct.replace(":v1:", ":v2:"), b"owner=alice")
    await decrypt_fails(vault, "credentials", ct.replace(":v1:", ":v9:"), b"owner=alice")
    other = ct.replace("tgv1:credentials:", "tgv1:credentials-other:")
    await decrypt_fails(vault, "credentials-other", other, b"owner=alice")  # wrong key
    await decrypt_fails(vault, "credentials", other, b"owner=alice")
    # A non-canonical base64 spelling of the very same bytes (unused low bits of the last character set).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare_bits = {2: 0b1111, 3: 0b11}[len(body_text) % 4]
    last = alphabet[alphabet.index(body_text[-1]) | spare_bits]
    assert last != body_text[-1]
    await decrypt_fails(vault, "credentials", f"{prefix}:{body_text[:-1]}{last}", b"owner=alice")
    # The log learns the cause; the caller never does.
    assert "authentication failed" in causes and "malformed ciphertext" in causes
    assert await vault.decrypt(AUTH, "credentials", ct, b"owner=alice") == b"0123456789abcdef"


async def test_wrong_key_of_the_right_name_fails(vaults: VaultFactory) -> None:
    """The same ciphertext under a vault whose key ring is another one (a key of the same name)."""
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"secret")
    await vault.update_key_config(OPS, "credentials", deletion_allowed=True)
    await vault.delete_key(OPS, "credentials")
    await vault.create_key(OPS, "credentials", AES)
    await decrypt_fails(vault, "credentials", ct)


async def test_sign_verify_and_hmac(vault: KeyVault, clock: FakeClock) -> None:
    await vault.create_key(OPS, "auth/jwt", KeyType.ED25519)
    await vault.create_key(OPS, "auth/ids", KeyType.HMAC_SHA256)
    sig1 = await vault.sign(AUTH, "auth/jwt", b"message")
    assert sig1.startswith("tgv1:auth/jwt:v1:")
    token = parse_token(sig1)
    assert token is not None
    public_key = (await vault.get_key(OPS, "auth/jwt")).latest.public_key
    assert primitives.ed25519_verify(public_key, b"message", token.body)  # a standard Ed25519 signature
    assert await vault.verify(TRADING, "auth/jwt", b"message", sig1)  # anyone in the mesh may verify
    assert not await vault.verify(AUTH, "auth/jwt", b"messagE", sig1)
    assert not await vault.verify(AUTH, "auth/jwt", b"message", sig1[:-2])
    assert not await vault.verify(AUTH, "auth/jwt", b"message", "garbage")
    await vault.rotate_key(OPS, "auth/jwt")
    sig2 = await vault.sign(AUTH, "auth/jwt", b"message")
    assert sig2.startswith("tgv1:auth/jwt:v2:")
    assert await vault.verify(AUTH, "auth/jwt", b"message", sig1)
    clock.advance(FRESHNESS_US)
    await vault.update_key_config(OPS, "auth/jwt", min_decryption_version=2)
    assert not await vault.verify(AUTH, "auth/jwt", b"message", sig1)
    assert await vault.verify(AUTH, "auth/jwt", b"message", sig2)
    with pytest.raises(PermissionDenied):
        await vault.sign(TRADING, "auth/jwt", b"message")

    mac = await vault.hmac(AUTH, "auth/ids", b"key-id")
    assert mac == await vault.hmac(AUTH, "auth/ids", b"key-id")  # deterministic
    assert mac != await vault.hmac(AUTH, "auth/ids", b"key-id2")
    assert await vault.verify(AUTH, "auth/ids", b"key-id", mac)
    assert not await vault.verify(AUTH, "auth/ids", b"key-id2", mac)
    # Wrong key type for the operation.
    with pytest.raises(FailedPrecondition) as info:
        await vault.encrypt(AUTH, "auth/jwt", b"x")
    assert info.value.reason == "KEY_TYPE_MISMATCH"
    with pytest.raises(FailedPrecondition):
        await vault.sign(AUTH, "auth/ids", b"x")


async def test_generate_data_key_and_batches(vault: KeyVault) -> None:
    await vault.create_key(OPS, "credentials", AES)
    both = await vault.generate_data_key(AUTH, "credentials", b"file-1")
    assert both.plaintext is not None and len(both.plaintext) == 32
    assert await vault.decrypt(AUTH, "credentials", both.wrapped, b"file-1") == both.plaintext
    wrapped_only = await vault.generate_data_key(AUTH, "credentials", b"file-2", include_plaintext=False)
    assert wrapped_only.plaintext is None
    assert len(await vault.decrypt(AUTH, "credentials", wrapped_only.wrapped, b"file-2")) == 32

    items = [(f"v{i}".encode(), f"ad{i}".encode()) for i in range(20)]
    sealed = await vault.batch_encrypt(AUTH, "credentials", items)
    assert all(isinstance(s, str) for s in sealed)
    requests = [(str(s), ad) for s, (_, ad) in zip(sealed, items, strict=True)]
    requests[7] = (requests[7][0], b"wrong")
    requests[11] = (requests[11][0][:-3], requests[11][1])
    opened = await vault.batch_decrypt(AUTH, "credentials", requests)
    for i, result in enumerate(opened):
        if i in (7, 11):
            assert isinstance(result, DecryptionFailed) and result.message == "decryption failed"
        else:
            assert result == items[i][0]
    with pytest.raises(PermissionDenied):
        await vault.batch_decrypt(TRADING, "credentials", requests)


async def test_only_hmac_holders_may_verify_an_hmac(vault: KeyVault) -> None:
    """Verify on an HMAC key is an HMAC computation: it needs the HMAC right; signatures stay open to all."""
    await vault.create_key(OPS, "credentials", KeyType.HMAC_SHA256)
    await vault.create_key(OPS, "auth/jwt", KeyType.ED25519)
    mac = await vault.hmac(AUTH, "credentials", b"123456")
    assert await vault.verify(AUTH, "credentials", b"123456", mac)
    assert not await vault.verify(AUTH, "credentials", b"000000", mac)
    for caller in ("ratelimit", TRADING, "monitor", "audit", OPS):
        for guess in (b"000000", b"123456"):
            with pytest.raises(PermissionDenied):
                await vault.verify(caller, "credentials", guess, mac)
    signature = await vault.sign(AUTH, "auth/jwt", b"m")
    for caller in ("ratelimit", TRADING, "monitor", "audit", OPS, AUTH):
        assert await vault.verify(caller, "auth/jwt", b"m", signature)
    with pytest.raises(PermissionDenied):
        await vault.verify("stranger", "auth/jwt", b"m", signature)
