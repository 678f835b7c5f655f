"""The vault core over real stores (SQLite and PostgreSQL): keys, versions, misuse, policy, sealing, restart."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import pytest

from services.keyvault import primitives
from services.keyvault.core import KeyVault
from services.keyvault.errors import (
    DecryptionFailed,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.keyvault.keyring import KeyType, b64url_decode, b64url_encode, parse_token
from services.keyvault.root import RootUnwrapError
from tradeguard.observability.logging import configure_logging

AES = KeyType.AES256_GCM
OPS, AUTH, TRADING = "ops", "auth", "trading"
HOUR_US = 3600 * 1_000_000


async def _decrypt_fails(vault: KeyVault, name: str, ciphertext: str, ad: bytes = b"") -> DecryptionFailed:
    with pytest.raises(DecryptionFailed) as info:
        await vault.decrypt(AUTH, name, ciphertext, ad)
    error = info.value
    # One opaque error, whatever the cause.
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
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


async def test_rotation_min_decryption_version_and_rewrap(vault):
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
        assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
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
        assert info.value.code is grpc.StatusCode.UNAVAILABLE and info.value.reason == "VAULT_SEALED"
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


async def test_sign_verify_and_hmac(vault):
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
