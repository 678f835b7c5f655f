"""The kit's VaultSigner and ensure_key against the real key vault over mutual TLS (as the audit service uses
them: key `audit/checkpoint`, workload `audit`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.keyvault.settings import Settings as KeyVaultSettings
from tests.support_auth import keyvault_settings, running_keyvault
from tradeguard.errors import Unavailable
from tradeguard.keyvault.signer import KeyVaultError, VaultSigner, ensure_key, parse_signature
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.testing import RunningService

KEY = "audit/checkpoint"


@pytest.fixture
async def keyvault(pki_paths: pki.PkiPaths) -> AsyncIterator[RunningService[KeyVaultSettings, Any]]:
    pki.issue(pki_paths, "audit")  # not among the session's workloads (tests/support.py)
    settings = keyvault_settings(pki_paths.home, "signer test passphrase", key_freshness_s=0.0)
    async with running_keyvault(pki_paths, settings) as service:
        async with service.channel("ops") as ops:
            assert await ensure_key(ops, KEY, pb.KEY_TYPE_ED25519) is True
        yield service


def _verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


async def test_sign_returns_the_version_and_a_signature_its_public_key_verifies(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("audit") as channel:
        signer = VaultSigner(channel, KEY)
        version, signature = await signer.sign(b"origin\n1\nroot\n")
        assert version == 1 and len(signature) == 64
        keys = await signer.public_keys()
        assert [v for v, _ in keys] == [1] and all(len(k) == 32 for _, k in keys)
        assert _verify(keys[0][1], signature, b"origin\n1\nroot\n")
        assert not _verify(keys[0][1], signature, b"origin\n2\nroot\n")


async def test_rotation_publishes_both_versions_until_the_old_one_is_retired(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("audit") as channel, keyvault.channel("ops") as ops_channel:
        signer = VaultSigner(channel, KEY)
        _, old = await signer.sign(b"m")
        ops = keyvault_pb2_grpc.KeyVaultServiceStub(ops_channel)
        await ops.RotateKey(pb.RotateKeyRequest(name=KEY), timeout=10)
        version, new = await signer.sign(b"m")
        assert version == 2
        keys = dict(await signer.public_keys())
        assert sorted(keys) == [1, 2]
        assert _verify(keys[1], old, b"m") and _verify(keys[2], new, b"m") and not _verify(keys[2], old, b"m")
        await ops.UpdateKeyConfig(pb.UpdateKeyConfigRequest(name=KEY, min_decryption_version=2), timeout=10)
        assert [v for v, _ in await signer.public_keys()] == [2]


async def test_a_workload_the_policy_does_not_allow_is_refused_opaquely(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("trading") as channel:
        signer = VaultSigner(channel, KEY)
        with pytest.raises(KeyVaultError) as refused:
            await signer.sign(b"m")
        assert refused.value.cause == "key vault sign: PERMISSION_DENIED VAULT_PERMISSION_DENIED"
        assert refused.value.message == "internal error" and refused.value.metadata == {}
        with pytest.raises(KeyVaultError) as unreadable:
            await signer.public_keys()
        assert unreadable.value.cause.startswith("key vault get key: PERMISSION_DENIED")


async def test_a_missing_key_and_a_key_of_another_type_are_refused(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("audit") as channel, keyvault.channel("ops") as ops:
        with pytest.raises(KeyVaultError) as missing:
            await VaultSigner(channel, "audit/missing").sign(b"m")
        assert missing.value.cause == "key vault sign: NOT_FOUND KEY_NOT_FOUND"
        assert await ensure_key(ops, "audit/mac", pb.KEY_TYPE_HMAC_SHA256) is True
        with pytest.raises(KeyVaultError) as not_ed25519:
            await VaultSigner(channel, "audit/mac").public_keys()
        assert not_ed25519.value.cause == "key vault get key: audit/mac is not an Ed25519 key"


async def test_ensure_key_is_idempotent_refuses_another_type_and_needs_ops(
    keyvault: RunningService[KeyVaultSettings, Any],
) -> None:
    async with keyvault.channel("ops") as ops:
        assert await ensure_key(ops, KEY, pb.KEY_TYPE_ED25519) is False  # exists: fine, not rotated
        key = (await keyvault_pb2_grpc.KeyVaultServiceStub(ops).GetKey(pb.GetKeyRequest(name=KEY))).key
        assert key.latest_version == 1
        with pytest.raises(KeyVaultError) as wrong:
            await ensure_key(ops, KEY, pb.KEY_TYPE_AES256_GCM)
        assert wrong.value.cause == f"key vault: key {KEY} exists with another type"
    async with keyvault.channel("audit") as audit:
        with pytest.raises(KeyVaultError) as refused:
            await ensure_key(audit, "audit/other", pb.KEY_TYPE_ED25519)
        assert refused.value.cause.startswith("key vault create key: PERMISSION_DENIED")


async def test_an_unreachable_vault_is_unavailable(keyvault: RunningService[KeyVaultSettings, Any]) -> None:
    channel = keyvault.channel("audit")
    await keyvault.running.stop(grace=0, drain=0)
    async with channel:
        with pytest.raises(Unavailable) as info:
            await VaultSigner(channel, KEY, timeout_s=2.0).sign(b"m")
    assert info.value.reason == "KEY_VAULT_UNAVAILABLE"
    assert grpc.StatusCode.UNAVAILABLE.name == info.value.code.value


def test_vault_signatures_are_parsed_strictly() -> None:
    good = f"tgv1:{KEY}:v7:" + "A" * 86  # 64 bytes in unpadded base64url
    assert parse_signature(KEY, good) == (7, bytes(64))
    for bad in (
        "tgv1:audit/other:v7:" + "A" * 86,  # another key
        f"tgv1:{KEY}:v0:" + "A" * 86,  # no version 0
        f"tgv1:{KEY}:v07:" + "A" * 86,
        f"tgv1:{KEY}:v7:" + "A" * 84,  # 63 bytes
        f"tgv1:{KEY}:v7:" + "A" * 85 + "B",  # not the canonical encoding of its bytes
        f"tgv1:{KEY}:v7:" + "A" * 86 + "=",
        f"tgv2:{KEY}:v7:" + "A" * 86,
    ):
        with pytest.raises(KeyVaultError):
            parse_signature(KEY, bad)
