"""The vault core over real stores (SQLite and PostgreSQL): keys, versions, misuse, policy, sealing, restart."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
from dataclasses import replace

import pytest

from services.keyvault import primitives
from services.keyvault.core import DEFAULT_KEY_FRESHNESS_US, KeyVault
from services.keyvault.errors import (
    Code,
    DecryptionFailed,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.keyvault.keyring import b64url_decode, b64url_encode, parse_token
from services.keyvault.model import KeyType, VersionRecord
from services.keyvault.policy import DEFAULT_POLICY, Operation, Policy, Rule
from services.keyvault.root import LocalSealedRoot, RootUnwrapError
from services.keyvault.store_sqlite import SqliteVaultStore
from tradeguard.observability.logging import configure_logging

from .conftest import PASSPHRASE, SCRYPT_N, HookedStore

AES = KeyType.AES256_GCM
OPS, AUTH, TRADING = "ops", "auth", "trading"
HOUR_US = 3600 * 1_000_000
FRESHNESS_US = DEFAULT_KEY_FRESHNESS_US  # the vault's default window (0.5 s)


async def _decrypt_fails(vault: KeyVault, name: str, ciphertext: str, ad: bytes = b"") -> DecryptionFailed:
    with pytest.raises(DecryptionFailed) as info:
        await vault.decrypt(AUTH, name, ciphertext, ad)
    error = info.value
    # One opaque error, whatever the cause.
    assert error.code is Code.INVALID_ARGUMENT
    assert error.reason == "DECRYPTION_FAILED"
    assert error.message == "decryption failed"
    assert error.metadata == {}
    return error


async def test_encrypt_decrypt_round_trip_and_format(vault):
    await vault.create_key(OPS, "credentials", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"api-secret", b"user-1")
    assert ct.startswith("tgv1:credentials:v1:")
    body = b64url_decode(ct.split(":", 3)[3])
    assert body is not None and len(body) == 12 + len(b"api-secret") + 16
    assert await vault.decrypt(AUTH, "credentials", ct, b"user-1") == b"api-secret"
    # Random nonces: the same plaintext twice gives two ciphertexts.
    assert await vault.encrypt(AUTH, "credentials", b"api-secret", b"user-1") != ct
    assert await vault.decrypt(AUTH, "credentials", await vault.encrypt(AUTH, "credentials", b""), b"") == b""


async def test_tampering_with_any_character_byte_prefix_or_ad_fails_opaquely(vault):
    await vault.create_key(OPS, "credentials", AES)
    await vault.create_key(OPS, "credentials-other", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"0123456789abcdef", b"owner=alice")
    causes = set()
    # Every character of the whole string replaced by another of the alphabet.
    for i in range(len(ct)):
        replacement = "A" if ct[i] != "A" else "B"
        causes.add(
            (
                await _decrypt_fails(vault, "credentials", ct[:i] + replacement + ct[i + 1 :], b"owner=alice")
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
            await _decrypt_fails(
                vault, "credentials", f"{prefix}:{b64url_encode(bytes(bad))}", b"owner=alice"
            )
    # Truncated at every length, and extended.
    for n in range(len(ct)):
        await _decrypt_fails(vault, "credentials", ct[:n], b"owner=alice")
    await _decrypt_fails(vault, "credentials", ct + "A", b"owner=alice")
    await _decrypt_fails(vault, "credentials", ct + "AAAA", b"owner=alice")
    # Altered associated data.
    for ad in (b"", b"owner=bob", b"owner=alice ", b"owner=alic"):
        causes.add((await _decrypt_fails(vault, "credentials", ct, ad)).cause)
    # Altered prefix: format, version, another key's name (which the caller names too).
    await _decrypt_fails(vault, "credentials", "tgv2" + ct[4:], b"owner=alice")
    await _decrypt_fails(vault, "credentials", ct.replace(":v1:", ":v01:"), b"owner=alice")
    await vault.rotate_key(OPS, "credentials")
    await _decrypt_fails(vault, "credentials", ct.replace(":v1:", ":v2:"), b"owner=alice")
    await _decrypt_fails(vault, "credentials", ct.replace(":v1:", ":v9:"), b"owner=alice")
    other = ct.replace("tgv1:credentials:", "tgv1:credentials-other:")
    await _decrypt_fails(vault, "credentials-other", other, b"owner=alice")  # wrong key
    await _decrypt_fails(vault, "credentials", other, b"owner=alice")
    # A non-canonical base64 spelling of the very same bytes (unused low bits of the last character set).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare_bits = {2: 0b1111, 3: 0b11}[len(body_text) % 4]
    last = alphabet[alphabet.index(body_text[-1]) | spare_bits]
    assert last != body_text[-1]
    await _decrypt_fails(vault, "credentials", f"{prefix}:{body_text[:-1]}{last}", b"owner=alice")
    # The log learns the cause; the caller never does.
    assert "authentication failed" in causes and "malformed ciphertext" in causes
    assert await vault.decrypt(AUTH, "credentials", ct, b"owner=alice") == b"0123456789abcdef"


async def test_wrong_key_of_the_right_name_fails(vaults):
    """The same ciphertext under a vault whose key ring is another one (a key of the same name)."""
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"secret")
    await vault.update_key_config(OPS, "credentials", deletion_allowed=True)
    await vault.delete_key(OPS, "credentials")
    await vault.create_key(OPS, "credentials", AES)
    await _decrypt_fails(vault, "credentials", ct)


async def test_rotation_min_decryption_version_and_rewrap(vault, clock):
    await vault.create_key(OPS, "credentials", AES)
    v1 = await vault.encrypt(AUTH, "credentials", b"one", b"ad")
    info = await vault.rotate_key(OPS, "credentials")
    assert info.latest.version == 2
    v2 = await vault.encrypt(AUTH, "credentials", b"two", b"ad")
    assert v2.startswith("tgv1:credentials:v2:")
    assert await vault.decrypt(AUTH, "credentials", v1, b"ad") == b"one"
    rewrapped = await vault.rewrap(AUTH, "credentials", v1, b"ad")
    assert rewrapped.startswith("tgv1:credentials:v2:")
    await _decrypt_fails(vault, "credentials", rewrapped, b"other-ad")
    with pytest.raises(InvalidArgument):
        await vault.update_key_config(OPS, "credentials", min_decryption_version=3)
    with pytest.raises(FailedPrecondition) as too_new:  # v2 is younger than the freshness window (1 s)
        await vault.update_key_config(OPS, "credentials", min_decryption_version=2)
    assert too_new.value.reason == "VERSION_TOO_NEW"
    clock.advance(FRESHNESS_US)
    await vault.update_key_config(OPS, "credentials", min_decryption_version=2)
    assert (await vault.get_key(OPS, "credentials")).config.min_decryption_version == 2
    error = await _decrypt_fails(vault, "credentials", v1, b"ad")  # below the minimum: same opaque error
    assert "below min_decryption_version" in error.cause
    with pytest.raises(DecryptionFailed):
        await vault.rewrap(AUTH, "credentials", v1, b"ad")
    assert await vault.decrypt(AUTH, "credentials", rewrapped, b"ad") == b"one"
    assert await vault.decrypt(AUTH, "credentials", v2, b"ad") == b"two"


async def test_rotation_and_rewrap_under_concurrent_encryption_lose_nothing(vault):
    await vault.create_key(OPS, "credentials", AES)
    sealed: list[tuple[bytes, bytes, str]] = []  # (plaintext, associated data, ciphertext)
    rotating = True

    async def encryptor(worker: int) -> None:
        n = 0
        while rotating or n < 5:
            plaintext, ad = f"value-{worker}-{n}".encode(), f"{worker}/{n}".encode()
            sealed.append((plaintext, ad, await vault.encrypt(AUTH, "credentials", plaintext, ad)))
            n += 1
            await asyncio.sleep(0)  # yield to the rotation (no wall-clock sleeping)

    async def rotate(times: int) -> None:
        nonlocal rotating
        try:
            for _ in range(times):
                await vault.rotate_key(OPS, "credentials")
        finally:
            rotating = False

    await asyncio.gather(rotate(10), *(encryptor(w) for w in range(32)))
    versions = {parse_token(ct).version for _, _, ct in sealed}  # type: ignore[union-attr]
    assert len(sealed) >= 32 * 5 and len(versions) >= 5  # encryption really ran across the rotations
    # Rewrap everything concurrently with more rotations; then every old and new ciphertext decrypts.
    rotating = True
    rewrapped, _ = await asyncio.gather(
        asyncio.gather(*(vault.rewrap(AUTH, "credentials", ct, ad) for _, ad, ct in sealed)), rotate(10)
    )
    for (plaintext, ad, ct), new in zip(sealed, rewrapped, strict=True):
        assert await vault.decrypt(AUTH, "credentials", ct, ad) == plaintext
        assert await vault.decrypt(AUTH, "credentials", new, ad) == plaintext
    assert (await vault.get_key(OPS, "credentials")).latest.version == 21


async def test_concurrent_rotations_by_two_replicas(vaults):
    """Two vault processes over one database rotate at once: versions stay dense, both decrypt everything."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    b = await vaults.open()
    await asyncio.gather(*(v.rotate_key(OPS, "credentials") for v in (a, b) for _ in range(5)))
    info = await a.get_key(OPS, "credentials")
    assert [v.version for v in info.versions] == list(range(1, 12))
    ct_b = await b.encrypt(AUTH, "credentials", b"from b")
    assert await a.decrypt(AUTH, "credentials", ct_b) == b"from b"  # a reloads the newer version it lacked


async def test_permission_before_existence_and_deny_by_default(vault):
    await vault.create_key(OPS, "credentials", AES)
    await vault.create_key(OPS, "trading/orders", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"secret")
    # The trading service may seal credentials but never open them.
    assert (await vault.encrypt(TRADING, "credentials", b"x")).startswith("tgv1:credentials:")
    for caller in (TRADING, "monitor", "", None, "ops"):
        with pytest.raises(PermissionDenied) as info:
            await vault.decrypt(caller, "credentials", ct)
        assert info.value.code is Code.PERMISSION_DENIED
    # A missing key answers PERMISSION_DENIED, not NOT_FOUND, to a caller without the right.
    with pytest.raises(PermissionDenied):
        await vault.decrypt(TRADING, "credentials-missing", ct)
    with pytest.raises(NotFound):
        await vault.decrypt(AUTH, "credentials-missing", ct)
    with pytest.raises(PermissionDenied):
        await vault.create_key(AUTH, "credentials-2", AES)  # only ops administers
    with pytest.raises(PermissionDenied):
        await vault.encrypt(AUTH, "trading/orders", b"x")
    with pytest.raises(PermissionDenied):
        await vault.rewrap(TRADING, "credentials", ct)
    with pytest.raises(PermissionDenied):
        await vault.generate_data_key(TRADING, "credentials")
    with pytest.raises(PermissionDenied):
        await vault.get_secret(TRADING, "alice", "auth/totp")
    with pytest.raises(PermissionDenied):
        await vault.get_secret(OPS, "alice", "auth/totp")  # operators never read secrets
    keys, token = await vault.list_keys(AUTH, 0, "")
    assert keys == [] and token == ""
    keys, _ = await vault.list_keys(OPS, 0, "")
    assert [k.config.name for k in keys] == ["credentials", "trading/orders"]


async def test_sealed_vault_is_unavailable_until_unsealed(vaults):
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", AES)
    ct = await vault.encrypt(AUTH, "credentials", b"secret")
    restarted = await vaults.open(unsealed=False)
    assert restarted.seal_status().sealed
    for call in (
        restarted.encrypt(AUTH, "credentials", b"x"),
        restarted.decrypt(AUTH, "credentials", ct),
        restarted.get_key(OPS, "credentials"),
        restarted.create_key(OPS, "k2", AES),
        restarted.put_secret(AUTH, "alice", "auth/totp", b"seed"),
    ):
        with pytest.raises(Unavailable) as info:
            await call
        assert info.value.code is Code.UNAVAILABLE and info.value.reason == "VAULT_SEALED"
    with pytest.raises(PermissionDenied):
        await restarted.unseal(AUTH, "correct horse battery staple")  # only ops unseals
    with pytest.raises(InvalidArgument) as wrong:
        await restarted.unseal(OPS, "wrong passphrase")
    assert "passphrase" in wrong.value.message
    assert restarted.seal_status().sealed
    status = await restarted.unseal(OPS, "correct horse battery staple")
    assert not status.sealed and status.root_kind == "local"
    assert await restarted.decrypt(AUTH, "credentials", ct) == b"secret"
    restarted.seal()
    with pytest.raises(Unavailable):
        await restarted.decrypt(AUTH, "credentials", ct)


async def test_restart_keeps_every_key_and_secret(vaults):
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", AES)
    await vault.create_key(OPS, "auth/jwt", KeyType.ED25519)
    await vault.create_key(OPS, "auth/api-key-ids", KeyType.HMAC_SHA256)
    ct1 = await vault.encrypt(AUTH, "credentials", b"first", b"ad")
    await vault.rotate_key(OPS, "credentials")
    ct2 = await vault.encrypt(AUTH, "credentials", b"second", b"ad")
    signature = await vault.sign(AUTH, "auth/jwt", b"header.payload")
    mac = await vault.hmac(AUTH, "auth/api-key-ids", b"key-id-1")
    await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-1")
    await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-2")
    await vault.close()

    again = await vaults.open()
    assert await again.decrypt(AUTH, "credentials", ct1, b"ad") == b"first"
    assert await again.decrypt(AUTH, "credentials", ct2, b"ad") == b"second"
    assert await again.verify(AUTH, "auth/jwt", b"header.payload", signature)
    assert await again.hmac(AUTH, "auth/api-key-ids", b"key-id-1") == mac
    assert (await again.get_secret(AUTH, "alice", "auth/totp"))[0] == b"seed-2"
    assert (await again.get_secret(AUTH, "alice", "auth/totp", 1))[0] == b"seed-1"
    assert (await again.get_key(OPS, "credentials")).latest.version == 2


async def test_database_holds_no_plaintext_and_no_key_material(vaults, backend, random):
    vault = await vaults.open()
    known = b"KNOWN-PLAINTEXT-4f1d9a7c"
    secret = b"KNOWN-SECRET-VALUE-77e3b1"
    await vault.create_key(OPS, "credentials", AES)
    await vault.create_key(OPS, "auth/jwt", KeyType.ED25519)
    await vault.create_key(OPS, "auth/hmac", KeyType.HMAC_SHA256)
    for _ in range(3):
        await vault.rotate_key(OPS, "credentials")
    await vault.encrypt(AUTH, "credentials", known, b"ad")
    await vault.put_secret(AUTH, "alice", "auth/totp", secret)
    await vault.put_secret(AUTH, "alice", "auth/totp", secret + b"-2")
    await vault.destroy_secret_version(AUTH, "alice", "auth/totp", 1)
    data = backend.raw_bytes()
    assert len(data) > 1000
    assert b"credentials" in data  # metadata is in clear: the search does look at the data
    for needle in (known, secret, secret + b"-2", b"KNOWN-"):
        assert needle not in data
    # No key material, root key or data key the vault ever drew from its random source.
    material = [value for value in random.outputs if len(value) == 32]
    assert len(material) >= 8
    for value in material:
        assert value not in data
        assert value.hex().encode() not in data


async def test_automatic_rotation_with_fake_clock(vault, clock):
    await vault.create_key(OPS, "credentials", AES, auto_rotate_period_us=24 * HOUR_US)
    await vault.create_key(OPS, "static", AES)
    clock.advance(23 * HOUR_US)
    assert await vault.rotate_due() == []
    clock.advance(HOUR_US)
    assert await vault.rotate_due() == ["credentials"]
    assert await vault.rotate_due() == []
    assert (await vault.get_key(OPS, "credentials")).latest.version == 2
    assert (await vault.get_key(OPS, "static")).latest.version == 1
    await vault.update_key_config(OPS, "credentials", auto_rotate_period_us=0)
    clock.advance(100 * HOUR_US)
    assert await vault.rotate_due() == []


async def test_deletion_only_when_allowed(vault):
    await vault.create_key(OPS, "credentials", AES)
    with pytest.raises(FailedPrecondition) as info:
        await vault.delete_key(OPS, "credentials")
    assert info.value.reason == "DELETION_NOT_ALLOWED"
    await vault.update_key_config(OPS, "credentials", deletion_allowed=True)
    await vault.delete_key(OPS, "credentials")
    with pytest.raises(NotFound):
        await vault.get_key(OPS, "credentials")
    with pytest.raises(NotFound):
        await vault.encrypt(AUTH, "credentials", b"x")


async def test_create_key_validation(vault):
    await vault.create_key(OPS, "credentials", AES)
    with pytest.raises(DomainError) as info:
        await vault.create_key(OPS, "credentials", AES)
    assert info.value.reason == "KEY_EXISTS"
    for bad in ("", "Credentials", "a:b", "-x", "x" * 129, "with space"):
        with pytest.raises(InvalidArgument):
            await vault.create_key(OPS, bad, AES)
    with pytest.raises(InvalidArgument):
        await vault.create_key(OPS, "k", AES, auto_rotate_period_us=-1)


async def test_sign_verify_and_hmac(vault, clock):
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


async def test_generate_data_key_and_batches(vault):
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


async def test_secret_store(vault, backend):
    v1 = await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-1")
    assert v1.version == 1
    v2 = await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-2", cas_version=1)
    assert v2.version == 2
    with pytest.raises(FailedPrecondition) as info:
        await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-3", cas_version=1)
    assert info.value.reason == "SECRET_CAS_MISMATCH"
    with pytest.raises(FailedPrecondition):
        await vault.put_secret(AUTH, "alice", "auth/totp", b"seed-3", cas_version=0)
    assert (await vault.put_secret(AUTH, "bob", "auth/totp", b"bob-seed", cas_version=0)).version == 1
    value, info2 = await vault.get_secret(AUTH, "alice", "auth/totp")
    assert value == b"seed-2" and info2.version == 2
    assert (await vault.get_secret(AUTH, "alice", "auth/totp", 1))[0] == b"seed-1"
    await vault.destroy_secret_version(OPS, "alice", "auth/totp", 1)
    with pytest.raises(FailedPrecondition) as destroyed:
        await vault.get_secret(AUTH, "alice", "auth/totp", 1)
    assert destroyed.value.reason == "SECRET_VERSION_DESTROYED"
    versions = await vault.list_secret_versions(OPS, "alice", "auth/totp")
    assert [(v.version, v.destroyed) for v in versions] == [(1, True), (2, False)]
    with pytest.raises(NotFound):
        await vault.get_secret(AUTH, "carol", "auth/totp")
    with pytest.raises(NotFound):
        await vault.destroy_secret_version(OPS, "alice", "auth/totp", 9)
    with pytest.raises(InvalidArgument):
        await vault.put_secret(AUTH, "a:b", "auth/totp", b"x")
    # Owner and path are bound in: bob's sealed value copied over alice's row does not open.
    backend.execute(
        "UPDATE {schema}.secret_versions SET ciphertext = "
        "(SELECT ciphertext FROM {schema}.secret_versions WHERE owner = 'bob'), wrapped_data_key = "
        "(SELECT wrapped_data_key FROM {schema}.secret_versions WHERE owner = 'bob') "
        "WHERE owner = 'alice' AND version = 2"
    )
    with pytest.raises(RootUnwrapError):
        await vault.get_secret(AUTH, "alice", "auth/totp", 2)


async def test_every_operation_is_logged_without_material(vault):
    out = io.StringIO()
    configure_logging(json=True, stream=out, level="debug")
    try:
        await vault.create_key(OPS, "credentials", AES)
        ct = await vault.encrypt(AUTH, "credentials", b"PLAINTEXT-MARKER", b"AD-MARKER")
        await vault.decrypt(AUTH, "credentials", ct, b"AD-MARKER")
        with pytest.raises(DecryptionFailed):
            await vault.decrypt(AUTH, "credentials", ct, b"AD-MARKER-WRONG")
        with pytest.raises(PermissionDenied):
            await vault.decrypt(TRADING, "credentials", ct)
        await vault.put_secret(AUTH, "alice", "auth/totp", b"SECRET-MARKER")
        await vault.get_secret(AUTH, "alice", "auth/totp")
    finally:
        configure_logging(json=True)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    events = [(e["event"], e.get("outcome")) for e in lines]
    assert ("keyvault.create_key", "ok") in events
    assert ("keyvault.encrypt", "ok") in events
    assert ("keyvault.decrypt", "ok") in events
    assert ("keyvault.decrypt", "failed") in events
    assert ("keyvault.decrypt", "permission_denied") in events
    assert ("keyvault.get_secret", "ok") in events
    text = out.getvalue()
    body = ct.rsplit(":", 1)[1]
    for marker in ("PLAINTEXT-MARKER", "AD-MARKER", "SECRET-MARKER", body, body[:16]):
        assert marker not in text


def _hooked(into: list[HookedStore]):
    def wrap(store):
        into.append(HookedStore(store))
        return into[-1]

    return wrap


async def test_replicas_sharing_a_store_see_each_others_changes_at_once(vaults, clock):
    """With a freshness window of 0, a rotation, a raised min_decryption_version or a deletion on replica A
    holds on replica B from B's very next operation (B had the key cached)."""
    a = await vaults.open(key_freshness_us=0)
    await a.create_key(OPS, "credentials", AES)
    await a.create_key(OPS, "auth/ids", KeyType.HMAC_SHA256)
    await a.create_key(OPS, "auth/jwt", KeyType.ED25519)
    b = await vaults.open(key_freshness_us=0)
    ct_v1 = await b.encrypt(AUTH, "credentials", b"old", b"ad")  # B caches every key
    sig_v1 = await b.sign(AUTH, "auth/jwt", b"m")
    assert (await b.hmac(AUTH, "auth/ids", b"x")).startswith("tgv1:auth/ids:v1:")
    clock.advance(1000)
    await a.rotate_key(OPS, "credentials")
    await a.update_key_config(OPS, "credentials", min_decryption_version=2)
    assert "below min_decryption_version" in (await _decrypt_fails(a, "credentials", ct_v1, b"ad")).cause
    assert "below min_decryption_version" in (await _decrypt_fails(b, "credentials", ct_v1, b"ad")).cause
    with pytest.raises(DecryptionFailed):
        await b.rewrap(AUTH, "credentials", ct_v1, b"ad")
    assert (await b.batch_decrypt(AUTH, "credentials", [(ct_v1, b"ad")]))[0].message == "decryption failed"
    # B encrypts under the new version only: nothing A refuses.
    ct_b = await b.encrypt(AUTH, "credentials", b"new", b"ad")
    assert ct_b.startswith("tgv1:credentials:v2:")
    assert await a.decrypt(AUTH, "credentials", ct_b, b"ad") == b"new"
    assert (await b.generate_data_key(AUTH, "credentials")).wrapped.startswith("tgv1:credentials:v2:")
    assert str((await b.batch_encrypt(AUTH, "credentials", [(b"x", b"")]))[0]).startswith(
        "tgv1:credentials:v2:"
    )
    # HMAC and signing keys likewise.
    await a.rotate_key(OPS, "auth/ids")
    assert (await b.hmac(AUTH, "auth/ids", b"x")).startswith("tgv1:auth/ids:v2:")
    await a.rotate_key(OPS, "auth/jwt")
    await a.update_key_config(OPS, "auth/jwt", min_decryption_version=2)
    assert not await b.verify(AUTH, "auth/jwt", b"m", sig_v1)
    assert (await b.sign(AUTH, "auth/jwt", b"m")).startswith("tgv1:auth/jwt:v2:")
    # Deleted on A: B refuses at once; created again under the name: B uses the new key's material.
    ct_b = await b.encrypt(AUTH, "credentials", b"new", b"ad")
    clock.advance(1000)
    await a.update_key_config(OPS, "credentials", deletion_allowed=True)
    await a.delete_key(OPS, "credentials")
    with pytest.raises(NotFound):
        await b.encrypt(AUTH, "credentials", b"x")
    with pytest.raises(NotFound):
        await b.decrypt(AUTH, "credentials", ct_b, b"ad")
    await a.create_key(OPS, "credentials", AES)
    again = await b.encrypt(AUTH, "credentials", b"again")
    assert await a.decrypt(AUTH, "credentials", again) == b"again"
    await _decrypt_fails(b, "credentials", ct_b, b"ad")  # the old key's ciphertext: another key now


@pytest.mark.parametrize("freshness_us", [0, FRESHNESS_US])
async def test_a_recreated_key_is_never_mixed_with_the_cached_one(vaults, clock, freshness_us):
    a = await vaults.open(key_freshness_us=freshness_us)
    await a.create_key(OPS, "credentials", AES, deletion_allowed=True)
    b = await vaults.open(key_freshness_us=freshness_us)
    old = await b.encrypt(AUTH, "credentials", b"old")
    clock.advance(1)
    await a.delete_key(OPS, "credentials")
    await a.create_key(OPS, "credentials", AES)  # B still holds the deleted key's v1 in memory
    clock.advance(freshness_us)  # B's cache is past its window (the documented bound for re-created names)
    new = await b.encrypt(AUTH, "credentials", b"new")
    assert await a.decrypt(AUTH, "credentials", new) == b"new"
    await _decrypt_fails(b, "credentials", old)


async def test_config_change_never_overwrites_a_concurrent_one(vaults, clock):
    """B reads the key, A raises min_decryption_version, B writes: B's write is retried on the new state."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    await a.rotate_key(OPS, "credentials")
    clock.advance(FRESHNESS_US)  # v2 may now retire v1
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=_hooked(hooked))
    hooked[0].after["get_key"] = lambda: a.update_key_config(OPS, "credentials", min_decryption_version=2)
    info = await b.update_key_config(OPS, "credentials", deletion_allowed=True)
    assert info.config.min_decryption_version == 2 and info.config.deletion_allowed
    stored = await a.get_key(OPS, "credentials")
    assert stored.config.min_decryption_version == 2 and stored.config.deletion_allowed


async def test_store_writes_are_compare_and_swap_and_all_or_nothing(vaults, backend, clock):
    vault = await vaults.open()
    await vault.create_key(OPS, "credentials", AES)
    await vault.rotate_key(OPS, "credentials")
    store = await backend.open()
    before = await store.get_key("credentials")
    assert await store.key_stamp("credentials") == (before.config.create_us, before.config.update_us)
    assert await store.key_stamp("missing") is None
    # A configuration written from a stale read changes nothing.
    stale = replace(before.config, min_decryption_version=2, deletion_allowed=True)
    assert await store.update_config(stale, before.config.update_us - 1) is None
    assert await store.get_key("credentials") == before
    # A version that is not the next one (a lost rotation race) writes nothing, not even update_us; nor does
    # the next version on a key changed since it was read (its configuration would be cached as unchanged).
    stamp = before.config.update_us
    for version, expected in ((2, stamp), (4, stamp), (3, stamp - 1)):
        record = VersionRecord(version, b"wrapped", b"", clock() + 5)
        assert await store.add_version("credentials", record, clock() + 5, expected) is None
        assert await store.get_key("credentials") == before
    assert await store.add_version("missing", VersionRecord(1, b"w", b"", 1), 1, 1) is None
    # update_us only grows, even when the clock does not move.
    first = await store.update_config(stale, before.config.update_us)
    assert first is not None and first > before.config.update_us
    second = await store.add_version("credentials", VersionRecord(3, b"w", b"", clock()), clock(), first)
    assert second is not None and second > first


async def test_automatic_rotation_once_per_period_across_replicas(vaults, clock):
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES, auto_rotate_period_us=24 * HOUR_US)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=_hooked(hooked))
    clock.advance(24 * HOUR_US)
    hooked[0].after["list_keys"] = a.rotate_due  # A rotates after B found the key due
    assert await b.rotate_due() == []
    assert (await a.get_key(OPS, "credentials")).latest.version == 2
    clock.advance(24 * HOUR_US)
    results = await asyncio.gather(a.rotate_due(), b.rotate_due(), a.rotate_due(), b.rotate_due())
    assert sorted(name for r in results for name in r) == ["credentials"]
    assert (await b.get_key(OPS, "credentials")).latest.version == 3


async def test_a_load_racing_a_local_rotation_returns_the_rotation(vaults, clock):
    hooked: list[HookedStore] = []
    vault = await vaults.open(wrap=_hooked(hooked))
    await vault.create_key(OPS, "credentials", AES)
    other = await vaults.open()
    await other.rotate_key(OPS, "credentials")
    clock.advance(FRESHNESS_US)  # the vault's cached key is stale and past its window: its next use reloads
    # While that reload is in flight the vault rotates the key itself; the load must not win over it.
    hooked[0].after["get_key"] = lambda: vault.rotate_key(OPS, "credentials")
    ct = await vault.encrypt(AUTH, "credentials", b"x")
    assert ct.startswith("tgv1:credentials:v3:")
    assert (await vault.encrypt(AUTH, "credentials", b"y")).startswith("tgv1:credentials:v3:")


async def test_only_hmac_holders_may_verify_an_hmac(vault):
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


async def test_list_keys_page_tokens_name_only_keys_the_caller_may_read(vaults):
    names = ["audit/tree", "auth/jwt", "credentials", "secret-admin-key", "trading/a", "trading/b", "zzz"]
    policy = Policy(
        [*DEFAULT_POLICY.rules, Rule("key/trading/*", frozenset({Operation.READ_KEY}), frozenset({TRADING}))]
    )
    vault = await vaults.open(policy=policy)
    for name in names:
        await vault.create_key(OPS, name, AES)

    async def pages(caller: str, size: int) -> tuple[list[list[str]], list[str]]:
        out, tokens, token = [], [], ""
        while True:
            keys, token = await vault.list_keys(caller, size, token)
            out.append([k.config.name for k in keys])
            if not token:
                return out, tokens
            tokens.append(token)
            assert len(tokens) < 20

    seen, tokens = await pages(TRADING, 1)
    assert [n for page in seen for n in page] == ["trading/a", "trading/b"]
    assert all(t.startswith("trading/") for t in tokens)
    seen, tokens = await pages(AUTH, 1)  # may read nothing: no token at all
    assert seen == [[]] and tokens == []
    for size in (1, 2, 3, 100):
        seen, _ = await pages(OPS, size)
        assert [n for page in seen for n in page] == names


async def test_auto_rotate_period_is_bounded(vault):
    for bad in (1, 30 * 60 * 1_000_000, 11 * 366 * 24 * HOUR_US, 2**62 * 1_000_000):
        with pytest.raises(InvalidArgument) as info:
            await vault.create_key(OPS, "k", AES, auto_rotate_period_us=bad)
        assert info.value.violations[0].field == "auto_rotate_period"
    await vault.create_key(OPS, "k", AES, auto_rotate_period_us=HOUR_US)
    await vault.create_key(OPS, "k2", AES, auto_rotate_period_us=0)
    with pytest.raises(InvalidArgument) as info:
        await vault.update_key_config(OPS, "k", auto_rotate_period_us=2**62)
    assert info.value.violations[0].field == "auto_rotate_period"
    info2 = await vault.update_key_config(OPS, "k", auto_rotate_period_us=3653 * 24 * HOUR_US)
    assert info2.config.auto_rotate_period_us == 3653 * 24 * HOUR_US


async def test_a_version_is_rotated_once_it_reaches_its_encryption_limit(vaults):
    out = io.StringIO()
    configure_logging(json=True, stream=out, level="debug")
    try:
        a = await vaults.open(max_encryptions_per_version=5)
        await a.create_key(OPS, "credentials", AES)
        sealed = [(b"%d" % i, await a.encrypt(AUTH, "credentials", b"%d" % i)) for i in range(5)]
        assert {parse_token(ct).version for _, ct in sealed} == {1}
        assert (await a.get_key(OPS, "credentials")).latest.version == 2  # the 5th encryption rotated it
        ct = await a.encrypt(AUTH, "credentials", b"v2")
        assert ct.startswith("tgv1:credentials:v2:")
        sealed.append((b"v2", ct))
        # Batches, data keys and rewraps count too.
        batch = await a.batch_encrypt(AUTH, "credentials", [(b"b", b"")] * 3)
        sealed += [(b"b", str(c)) for c in batch]
        await a.rewrap(AUTH, "credentials", ct)
        assert (await a.get_key(OPS, "credentials")).latest.version == 3
        # Two replicas: each one's count stays below the limit; the store adds them up at the rotation check.
        b = await vaults.open(max_encryptions_per_version=5)
        for vault in (a, a, a, b, b, b):
            sealed.append((b"x", await vault.encrypt(AUTH, "credentials", b"x")))
        assert (await a.get_key(OPS, "credentials")).latest.version == 3
        assert await a.rotate_due() == []  # 3 stored
        assert await b.rotate_due() == ["credentials"]  # 6 stored: over the limit
        assert await a.rotate_due() == [] and await b.rotate_due() == []
        assert (await a.get_key(OPS, "credentials")).latest.version == 4
        for plaintext, ciphertext in sealed:
            assert await b.decrypt(AUTH, "credentials", ciphertext) == plaintext
    finally:
        configure_logging(json=True)
    limits = [json.loads(line) for line in out.getvalue().splitlines() if "encryption_limit" in line]
    assert [(e["resource"], e["version"], e["limit"]) for e in limits] == [
        ("credentials", 1, 5),
        ("credentials", 2, 5),
        ("credentials", 3, 5),
    ]
    assert limits[-1]["encryptions"] == 6


async def test_sqlite_files_are_owner_only_and_keep_no_destroyed_secret(tmp_path, clock, random):
    """After DestroySecretVersion (and DeleteKey) neither the database nor its -wal and -shm files, read while
    the store is open, hold the sealed value or its wrapped data key; every file is 0600."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "kv.db"
        store = await SqliteVaultStore.open(path)
        root = LocalSealedRoot.create(tmp_path / "root", PASSPHRASE, random, scrypt_n=SCRYPT_N)
        vault = KeyVault(store, clock=clock, random=random, root=root)
        await vault.start()
        await vault.put_secret(AUTH, "u1", "auth/totp", b"S" * 64)
        await vault.put_secret(AUTH, "u1", "auth/totp", b"T" * 64)
        await vault.create_key(OPS, "doomed", AES, deletion_allowed=True)
        destroyed = await store.get_secret_version("u1", "auth/totp", 1)
        kept = await store.get_secret_version("u1", "auth/totp", 2)
        doomed = await store.get_key("doomed")
        assert destroyed is not None and kept is not None and doomed is not None

        def files() -> dict[str, bytes]:
            return {p.name: p.read_bytes() for p in sorted(tmp_path.glob("kv.db*"))}

        assert any(kept.ciphertext in data for data in files().values())  # the search does see live data
        await vault.destroy_secret_version(OPS, "u1", "auth/totp", 1)
        await vault.delete_key(OPS, "doomed")
        found = files()
        assert set(found) == {"kv.db", "kv.db-wal", "kv.db-shm"}
        for name, data in found.items():
            assert destroyed.ciphertext not in data, name
            assert destroyed.wrapped_data_key not in data, name
            assert doomed.versions[0].wrapped not in data, name
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        assert (await vault.get_secret(AUTH, "u1", "auth/totp"))[0] == b"T" * 64
        await vault.close()
        await store.close()
        # Files of an older, looser deployment are tightened when opened.
        path.chmod(0o644)
        store = await SqliteVaultStore.open(path)
        await store.put_meta_if_absent("probe", b"x")
        for p in tmp_path.glob("kv.db*"):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
        await store.close()
    finally:
        os.umask(old_umask)


async def test_a_replica_trusts_its_cached_key_for_the_freshness_window_then_sees_changes(vaults, clock):
    """Within the window B serves from its cache without a single store read (it may still use v1 that A has
    rotated away from); from the window's end B's next use reads the stamp once, sees A's rotation and
    reloads. Concurrent uses after the window share one stamp read."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=_hooked(hooked))
    calls = hooked[0].calls
    ct_v1 = await b.encrypt(AUTH, "credentials", b"v1", b"ad")  # B loads the key, confirmed now (T0)
    assert (calls["get_key"], calls["key_stamp"]) == (1, 0)
    clock.advance(1000)
    await a.rotate_key(OPS, "credentials")  # v2 exists from T0 + 1 ms
    for step in (0, FRESHNESS_US - 1000 - 1):  # (a) up to the last microsecond of the window
        clock.advance(step)
        assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v1:")
        assert await b.decrypt(AUTH, "credentials", ct_v1, b"ad") == b"v1"
    assert (calls["get_key"], calls["key_stamp"]) == (1, 0)  # not one store read
    clock.advance(1)  # (b) the window is over: one stamp read, which shows A's rotation, and a reload
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    assert (calls["get_key"], calls["key_stamp"]) == (2, 1)
    for _ in range(3):  # a new window from the reload
        assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    assert (calls["get_key"], calls["key_stamp"]) == (2, 1)
    clock.advance(FRESHNESS_US)  # unchanged in the store: 32 concurrent uses cost one stamp read, no load
    sealed = await asyncio.gather(*(b.encrypt(AUTH, "credentials", b"%d" % i) for i in range(32)))
    assert all(ct.startswith("tgv1:credentials:v2:") for ct in sealed)
    assert (calls["get_key"], calls["key_stamp"]) == (2, 2)
    # A ciphertext of a version B lacks is never refused for being new: B reloads at once, in the window.
    clock.advance(1000)
    await a.rotate_key(OPS, "credentials")
    ct_v3 = await a.encrypt(AUTH, "credentials", b"v3")
    assert await b.decrypt(AUTH, "credentials", ct_v3) == b"v3"
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v3:")


async def test_retiring_versions_waits_until_no_replica_can_encrypt_under_them(vaults, clock):
    """(c) min_decryption_version may be raised to N only once N is a whole window old: by then every replica's
    cache holds N. A stale replica may go on opening retired versions for at most one window after the raise
    (the documented bound); it never seals anything under a retired version."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    b = await vaults.open()
    ct_v1 = await b.encrypt(AUTH, "credentials", b"v1")  # B caches v1 only
    clock.advance(10)
    await a.rotate_key(OPS, "credentials")  # v2 created at T
    for waited, retry_ms in ((0, str(FRESHNESS_US // 1000)), (FRESHNESS_US - 1, "1")):
        clock.advance(waited)
        with pytest.raises(FailedPrecondition) as refused:
            await a.update_key_config(OPS, "credentials", min_decryption_version=2)
        error = refused.value
        assert (error.code, error.reason) == (Code.FAILED_PRECONDITION, "VERSION_TOO_NEW")
        assert error.metadata == {"key_name": "credentials", "version": "2", "retry_after_ms": retry_ms}
        assert "retry in" in error.message
        assert error.retry_after_seconds == (FRESHNESS_US - waited) / 1e6  # RetryInfo
        assert (await a.get_key(OPS, "credentials")).config.min_decryption_version == 1
        # Meanwhile B, inside its window since its last confirmation, still seals under v1: legitimately,
        # v1 is not retired, and cannot be while B might do so.
    clock.advance(1)  # v2 is a whole window old: every replica encrypts under v2 from now on
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    raised_at = clock()
    await a.update_key_config(OPS, "credentials", min_decryption_version=2)
    await _decrypt_fails(a, "credentials", ct_v1)
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    assert await b.decrypt(AUTH, "credentials", ct_v1) == b"v1"  # B's cache predates the raise: the bound
    clock.advance(raised_at + FRESHNESS_US - clock())
    await _decrypt_fails(b, "credentials", ct_v1)  # at most one window after the raise
    # Lowering it again retires nothing: no wait. Raising to an old version: no wait either.
    await a.update_key_config(OPS, "credentials", min_decryption_version=1)
    await a.rotate_key(OPS, "credentials")  # v3, brand new
    await a.update_key_config(OPS, "credentials", min_decryption_version=2)
    with pytest.raises(FailedPrecondition):
        await a.update_key_config(OPS, "credentials", min_decryption_version=3)


async def test_freshness_zero_reads_the_stamp_before_every_use_and_retires_at_once(vaults, clock):
    """(d) key_freshness_us=0 is the strict mode: a stamp read per operation, every change visible on the next
    operation, and versions may be retired as soon as they exist."""
    a = await vaults.open(key_freshness_us=0)
    await a.create_key(OPS, "credentials", AES)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=_hooked(hooked), key_freshness_us=0)
    calls = hooked[0].calls
    ct_v1 = await b.encrypt(AUTH, "credentials", b"v1")
    for _ in range(5):
        await b.encrypt(AUTH, "credentials", b"x")
    assert (calls["get_key"], calls["key_stamp"]) == (1, 5)  # the clock never moved: still read every time
    await a.rotate_key(OPS, "credentials")
    await a.update_key_config(OPS, "credentials", min_decryption_version=2)  # at once
    await _decrypt_fails(b, "credentials", ct_v1)
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v2:")
    assert calls["key_stamp"] == 7


async def test_a_stamp_read_slower_than_the_window_is_not_trusted(vaults, clock):
    """A confirmation counts from when its read began: a read that outlasts the window is read again, and a
    store that is always that slow makes the operation fail UNAVAILABLE rather than use an unconfirmed key."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=_hooked(hooked))
    calls = hooked[0].calls
    await b.encrypt(AUTH, "credentials", b"x")
    clock.advance(FRESHNESS_US)

    async def slow() -> None:
        clock.advance(FRESHNESS_US)

    hooked[0].after["key_stamp"] = slow  # once: the second read is quick
    assert (await b.encrypt(AUTH, "credentials", b"x")).startswith("tgv1:credentials:v1:")
    assert calls["key_stamp"] == 2

    async def always_slow() -> None:
        clock.advance(FRESHNESS_US)
        hooked[0].after["key_stamp"] = always_slow

    clock.advance(FRESHNESS_US)
    hooked[0].after["key_stamp"] = always_slow
    with pytest.raises(Unavailable) as info:
        await b.encrypt(AUTH, "credentials", b"x")
    assert info.value.reason == "KEY_STORE_SLOW"
    assert calls["key_stamp"] == 5
    with pytest.raises(ValueError):
        await vaults.open(key_freshness_us=-1)


async def test_a_rotation_never_caches_a_configuration_changed_concurrently(vaults, clock):
    """B reads the key to rotate it, A raises min_decryption_version, B appends its version: the append is
    compare-and-swap on update_us, so B retries on the new state rather than cache the old minimum under the
    store's new stamp (which no later stamp read would ever catch)."""
    a = await vaults.open()
    await a.create_key(OPS, "credentials", AES)
    ct_v1 = await a.encrypt(AUTH, "credentials", b"v1")
    await a.rotate_key(OPS, "credentials")
    clock.advance(FRESHNESS_US)
    hooked: list[HookedStore] = []
    b = await vaults.open(wrap=_hooked(hooked))
    hooked[0].after["get_key"] = lambda: a.update_key_config(OPS, "credentials", min_decryption_version=2)
    info = await b.rotate_key(OPS, "credentials")
    assert info.latest.version == 3 and info.config.min_decryption_version == 2
    assert hooked[0].calls["add_version"] == 2  # the first append lost the race
    await _decrypt_fails(b, "credentials", ct_v1)
    clock.advance(FRESHNESS_US)
    await _decrypt_fails(b, "credentials", ct_v1)
    assert await b.get_key(OPS, "credentials") == await a.get_key(OPS, "credentials")
