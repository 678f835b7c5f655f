"""The auth service's key vault client against the real key vault over mutual TLS."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.auth.vault_client import KeyVaultError, VaultClient, ensure_keys, parse_signature
from services.keyvault.settings import Settings as KeyVaultSettings
from tradeguard.errors import Unavailable
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.testing import FakeClock, RunningService

KEY_ID = "tgk_exampleexampleexampleexample0000000"


async def test_seal_and_open_with_associated_data(vault: VaultClient) -> None:
    ciphertext = await vault.seal(b"totp-seed", b"user-1")
    assert ciphertext.startswith("tgv1:credentials:v1:") and "totp-seed" not in ciphertext
    assert await vault.open(ciphertext, b"user-1") == b"totp-seed"


async def test_open_refuses_other_associated_data_and_alterations_opaquely(vault: VaultClient) -> None:
    ciphertext = await vault.seal(b"secret-material", b"user-1")
    causes = set()
    for bad, ad in (
        (ciphertext, b"user-2"),
        (ciphertext[:-2], b"user-1"),
        ("tgv1:credentials:v1:AAAA", b"user-1"),
    ):
        with pytest.raises(KeyVaultError) as failed:
            await vault.open(bad, ad)
        error = failed.value
        assert error.message == "internal error" and error.metadata == {}
        assert "secret-material" not in error.cause and bad not in error.cause
        causes.add(error.cause)
    assert causes == {"key vault decrypt: INVALID_ARGUMENT DECRYPTION_FAILED"}


async def test_sign_returns_the_kid_and_a_signature_the_public_key_verifies(vault: VaultClient) -> None:
    kid, signature = await vault.sign(b"header.payload")
    assert kid == "auth/jwt:v1" and len(signature) == 64
    keys = dict(await vault.public_keys())
    assert list(keys) == ["auth/jwt:v1"]
    Ed25519PublicKey.from_public_bytes(keys[kid]).verify(signature, b"header.payload")


async def test_rotation_keeps_the_previous_public_key_until_retired(
    vault: VaultClient, keyvault: RunningService[KeyVaultSettings, Any]
) -> None:
    old_kid, old_signature = await vault.sign(b"m")
    async with keyvault.channel("ops") as ops_channel:
        ops = keyvault_pb2_grpc.KeyVaultServiceStub(ops_channel)
        await ops.RotateKey(pb.RotateKeyRequest(name="auth/jwt"))
        new_kid, _ = await vault.sign(b"m")
        assert (old_kid, new_kid) == ("auth/jwt:v1", "auth/jwt:v2")
        keys = dict(await vault.public_keys())
        assert list(keys) == ["auth/jwt:v1", "auth/jwt:v2"]
        Ed25519PublicKey.from_public_bytes(keys[old_kid]).verify(old_signature, b"m")
        # Once the operator retires v1, it is no longer published.
        await ops.UpdateKeyConfig(pb.UpdateKeyConfigRequest(name="auth/jwt", min_decryption_version=2))
        assert [kid for kid, _ in await vault.public_keys()] == ["auth/jwt:v2"]


def test_vault_signatures_are_parsed_strictly() -> None:
    good = "tgv1:auth/jwt:v7:" + "A" * 86  # 64 bytes in unpadded base64url
    assert parse_signature("auth/jwt", good) == (7, bytes(64))
    for bad in (
        "tgv1:other:v7:" + "A" * 86,  # another key
        "tgv1:auth/jwt:v0:" + "A" * 86,  # no version 0
        "tgv1:auth/jwt:v07:" + "A" * 86,
        "tgv1:auth/jwt:v7:" + "A" * 84,  # 63 bytes
        "tgv1:auth/jwt:v7:" + "A" * 85 + "B",  # not the canonical encoding of its bytes
        "tgv1:auth/jwt:v7:" + "A" * 86 + "=",
        "tgv2:auth/jwt:v7:" + "A" * 86,
    ):
        with pytest.raises(KeyVaultError):
            parse_signature("auth/jwt", bad)


async def test_secret_cache_is_bounded_timed_and_forgets_on_rotation(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    clock = FakeClock()
    seconds = lambda: clock() / 1e6  # noqa: E731
    async with keyvault.channel("auth") as channel:
        vault = VaultClient(channel, secret_cache_size=2, secret_cache_ttl_s=60.0, clock=seconds)
        ids = [f"tgk_{i}" for i in range(3)]
        ciphertexts = [
            await vault.seal(f"tgs_secret{i}".encode(), key_id.encode()) for i, key_id in enumerate(ids)
        ]
        assert await vault.open_secret(ids[0], ciphertexts[0]) == "tgs_secret0"
        assert vault.cached_secrets == 1
        # Cached: answered without the vault (a ciphertext that would not open proves no call was made).
        assert await vault.open_secret(ids[0], ciphertexts[0]) == "tgs_secret0"
        await vault.open_secret(ids[1], ciphertexts[1])
        await vault.open_secret(ids[2], ciphertexts[2])
        assert vault.cached_secrets == 2  # the bound: the least recently used (ids[0]) went first
        # The cache key includes the ciphertext: a rotated secret is never answered from the cache.
        rotated = await vault.seal(b"tgs_rotated", ids[2].encode())
        assert await vault.open_secret(ids[2], rotated) == "tgs_rotated"
        assert vault.cached_secrets == 2  # ids[2] twice (old and rotated ciphertext); ids[1] was evicted
        vault.forget(ids[2])  # both of its entries go
        assert vault.cached_secrets == 0
        # A secret bound to another key id does not open under this one (associated data).
        with pytest.raises(KeyVaultError):
            await vault.open_secret(ids[0], ciphertexts[1])
        # After the time to live the vault is asked again.
        await vault.open_secret(ids[1], ciphertexts[1])
        clock.advance_s(61)
        assert vault._secrets.get(ids[1], ciphertexts[1]) is None


async def test_secret_cache_serves_hits_without_the_vault(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("auth") as channel:
        vault = VaultClient(channel, timeout_s=2.0)
        ciphertext = await vault.seal(b"tgs_cached", KEY_ID.encode())
        assert await vault.open_secret(KEY_ID, ciphertext) == "tgs_cached"
        await keyvault.running.stop(grace=0, drain=0)
        # The vault is gone: only the cache can answer now.
        assert await vault.open_secret(KEY_ID, ciphertext) == "tgs_cached"
        vault.forget(KEY_ID)  # a rotated or revoked key: its secret is asked of the vault again
        with pytest.raises(Unavailable):
            await vault.open_secret(KEY_ID, ciphertext)


async def test_other_workloads_are_refused_and_errors_carry_no_material(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("trading") as channel:
        trading = VaultClient(channel)
        ciphertext = await trading.seal(b"sealed-by-trading", b"ad")  # trading may seal credentials
        with pytest.raises(KeyVaultError) as denied:
            await trading.open(ciphertext, b"ad")  # ...never open them
        assert denied.value.cause == "key vault decrypt: PERMISSION_DENIED VAULT_PERMISSION_DENIED"
        with pytest.raises(KeyVaultError):
            await trading.sign(b"m")


async def test_unreachable_vault_is_unavailable(keyvault: RunningService[KeyVaultSettings, Any]) -> None:
    channel = keyvault.channel("auth")
    await keyvault.running.stop(grace=0, drain=0)
    async with channel:
        with pytest.raises(Unavailable) as info:
            await VaultClient(channel, timeout_s=2.0).seal(b"x", b"y")
    assert info.value.reason == "KEY_VAULT_UNAVAILABLE" and "x" not in info.value.message


async def test_ensure_keys_is_idempotent_and_refuses_a_key_of_another_type(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("ops") as ops:
        await ensure_keys(ops)  # both exist already: fine
        with pytest.raises(KeyVaultError) as wrong:
            await ensure_keys(ops, jwt_key="credentials")
        assert "another type" in wrong.value.cause
    async with keyvault.channel("auth") as auth:
        with pytest.raises(KeyVaultError) as refused:  # only ops may create keys
            await ensure_keys(auth, credentials_key="auth/other")
        assert refused.value.cause.startswith("key vault create key: PERMISSION_DENIED")


async def test_a_channel_error_code_maps_to_the_kits_errors(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("auth") as channel:
        vault = VaultClient(channel, jwt_key="auth/missing")
        with pytest.raises(KeyVaultError) as missing:
            await vault.public_keys()
        assert missing.value.cause == "key vault get key: NOT_FOUND KEY_NOT_FOUND"
        assert missing.value.code.value == grpc.StatusCode.INTERNAL.name
