"""The key vault end to end over mutual TLS: real server, real certificates, rich errors."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import Protocol

import grpc
import pytest
from google.protobuf import duration_pb2

from services.keyvault.core import KeyVault
from services.keyvault.service import SERVICE
from services.keyvault.settings import Settings, StartupSecret
from services.keyvault.store import VaultStore
from tests.support import NOT_RECORDED
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel
from tradeguard.mesh.server import ServerConfig
from tradeguard.observability.logging import configure_logging
from tradeguard.rpc.status import rich_status
from tradeguard.service import Running, Wiring
from tradeguard.service import start as start_service
from tradeguard.testing import eventually

PASSPHRASE = "server test passphrase"


def _error(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, str]:
    status = rich_status(err)
    assert status.reason is not None, f"no ErrorInfo ({status.details_problem})"
    return status.code, status.reason, status.message


@dataclass
class RunningVault:
    running: Running[Settings, VaultStore]
    paths: pki.PkiPaths
    port: int

    def stub(self, caller: str) -> tuple[MeshChannel, keyvault_pb2_grpc.KeyVaultServiceAsyncStub]:
        channel = MeshChannel(f"127.0.0.1:{self.port}", "keyvault", tls.Workload.of(self.paths, caller))
        return channel, keyvault_pb2_grpc.KeyVaultServiceStub(channel)


class StartVault(Protocol):
    """The `start_vault` fixture: a key vault on a free port; `overrides` replace fields of its Settings."""

    def __call__(self, **overrides: object) -> Awaitable[RunningVault]: ...


@pytest.fixture
async def start_vault(pki_paths: pki.PkiPaths) -> AsyncIterator[StartVault]:
    running: list[RunningVault] = []
    home = pki_paths.home
    for name in ("audit",):
        pki.issue(pki_paths, name)

    async def start(**overrides: object) -> RunningVault:
        settings = Settings(
            server=ServerConfig(name="keyvault", port=0, home=home, grace_s=1.0),
            database_url=f"sqlite:///{home / 'data' / 'keyvault.db'}",
            root_path=home / "data" / "keyvault.root",
            startup=StartupSecret(PASSPHRASE),
            scrypt_n=2**10,
            recording=NOT_RECORDED,
        )
        running_vault = await start_service(SERVICE, replace(settings, **overrides))  # type: ignore[arg-type]
        r = RunningVault(running_vault, pki_paths, running_vault.port)
        running.append(r)
        return r

    yield start
    for r in running:
        await r.running.stop(0, drain=0)


async def test_keys_encrypt_decrypt_and_policy_over_mtls(start_vault: StartVault) -> None:
    vault = await start_vault(key_freshness_s=0.0)  # strict: v2 may retire v1 at once (no waiting in tests)
    ops_channel, ops = vault.stub("ops")
    auth_channel, auth = vault.stub("auth")
    trading_channel, trading = vault.stub("trading")
    async with ops_channel, auth_channel, trading_channel:
        created = await ops.CreateKey(
            pb.CreateKeyRequest(
                name="credentials",
                type=pb.KEY_TYPE_AES256_GCM,
                auto_rotate_period=duration_pb2.Duration(seconds=86400),
            ),
            timeout=5,
        )
        assert created.key.latest_version == 1 and created.key.auto_rotate_period.seconds == 86400
        enc = await auth.Encrypt(
            pb.EncryptRequest(key_name="credentials", plaintext=b"api-secret", associated_data=b"user-1"),
            timeout=5,
        )
        assert enc.ciphertext.startswith("tgv1:credentials:v1:")
        dec = await auth.Decrypt(
            pb.DecryptRequest(key_name="credentials", ciphertext=enc.ciphertext, associated_data=b"user-1"),
            timeout=5,
        )
        assert dec.plaintext == b"api-secret"
        # The trading service may not decrypt credentials.
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await trading.Decrypt(
                pb.DecryptRequest(key_name="credentials", ciphertext=enc.ciphertext), timeout=5
            )
        assert _error(denied.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "VAULT_PERMISSION_DENIED")
        # Only ops administers keys (the mesh's method allow-list answers first).
        with pytest.raises(grpc.aio.AioRpcError) as admin:
            await auth.RotateKey(pb.RotateKeyRequest(name="credentials"), timeout=5)
        assert admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Every tampering gives the same opaque answer.
        answers = set()
        for bad, ad in (
            (enc.ciphertext[:-2], b"user-1"),
            (enc.ciphertext, b"user-2"),
            (enc.ciphertext.replace(":v1:", ":v2:"), b"user-1"),
            ("tgv1:credentials:v1:AAAA", b"user-1"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await auth.Decrypt(
                    pb.DecryptRequest(key_name="credentials", ciphertext=bad, associated_data=ad)
                )
            answers.add(_error(failed.value))
        assert answers == {(grpc.StatusCode.INVALID_ARGUMENT, "DECRYPTION_FAILED", "decryption failed")}
        # Batch: one bad item fails alone.
        batch = await auth.BatchDecrypt(
            pb.BatchDecryptRequest(
                key_name="credentials",
                items=[
                    pb.BatchDecryptItem(ciphertext=enc.ciphertext, associated_data=b"user-1"),
                    pb.BatchDecryptItem(ciphertext=enc.ciphertext, associated_data=b"nope"),
                ],
            ),
            timeout=5,
        )
        assert batch.results[0].plaintext == b"api-secret"
        assert batch.results[1].error.reason == "DECRYPTION_FAILED"
        assert batch.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        # Rotation, rewrap, data keys.
        rotated = await ops.RotateKey(pb.RotateKeyRequest(name="credentials"), timeout=5)
        assert rotated.key.latest_version == 2 and [v.version for v in rotated.key.versions] == [1, 2]
        rewrapped = await auth.Rewrap(
            pb.RewrapRequest(key_name="credentials", ciphertext=enc.ciphertext, associated_data=b"user-1")
        )
        assert rewrapped.ciphertext.startswith("tgv1:credentials:v2:")
        await ops.UpdateKeyConfig(pb.UpdateKeyConfigRequest(name="credentials", min_decryption_version=2))
        with pytest.raises(grpc.aio.AioRpcError) as old:
            await auth.Decrypt(
                pb.DecryptRequest(
                    key_name="credentials", ciphertext=enc.ciphertext, associated_data=b"user-1"
                )
            )
        assert _error(old.value)[1] == "DECRYPTION_FAILED"
        dk = await auth.GenerateDataKey(
            pb.GenerateDataKeyRequest(key_name="credentials", format=pb.DATA_KEY_FORMAT_WRAPPED_ONLY)
        )
        assert dk.plaintext == b"" and dk.wrapped_key.startswith("tgv1:credentials:v2:")
        # Deletion is refused until allowed.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ops.DeleteKey(pb.DeleteKeyRequest(name="credentials"))
        assert _error(refused.value)[:2] == (grpc.StatusCode.FAILED_PRECONDITION, "DELETION_NOT_ALLOWED")
        listed = await ops.ListKeys(pb.ListKeysRequest())
        assert [k.name for k in listed.keys] == ["credentials"]


async def test_signing_hmac_and_secrets_over_mtls(start_vault: StartVault) -> None:
    vault = await start_vault()
    ops_channel, ops = vault.stub("ops")
    auth_channel, auth = vault.stub("auth")
    audit_channel, audit = vault.stub("audit")
    async with ops_channel, auth_channel, audit_channel:
        await ops.CreateKey(pb.CreateKeyRequest(name="audit/tree-heads", type=pb.KEY_TYPE_ED25519))
        await ops.CreateKey(pb.CreateKeyRequest(name="auth/api-key-ids", type=pb.KEY_TYPE_HMAC_SHA256))
        signed = await audit.Sign(pb.SignRequest(key_name="audit/tree-heads", message=b"root-hash"))
        assert (
            await auth.Verify(
                pb.VerifyRequest(
                    key_name="audit/tree-heads", message=b"root-hash", signature=signed.signature
                )
            )
        ).valid
        key = (await ops.GetKey(pb.GetKeyRequest(name="audit/tree-heads"))).key
        assert len(key.versions[0].public_key) == 32  # public half only; the proto has no field for material
        mac = await auth.Hmac(pb.HmacRequest(key_name="auth/api-key-ids", data=b"kid-1"))
        assert mac.mac.startswith("tgv1:auth/api-key-ids:v1:")

        put = await auth.PutSecret(
            pb.PutSecretRequest(owner="alice", path="auth/totp", value=b"seed", cas_version=0)
        )
        assert put.version.version == 1
        got = await auth.GetSecret(pb.GetSecretRequest(owner="alice", path="auth/totp"))
        assert got.value == b"seed" and got.version.version == 1
        await ops.DestroySecretVersion(
            pb.DestroySecretVersionRequest(owner="alice", path="auth/totp", version=1)
        )
        versions = await ops.ListSecretVersions(pb.ListSecretVersionsRequest(owner="alice", path="auth/totp"))
        assert versions.versions[0].HasField("destroy_time")
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await auth.GetSecret(pb.GetSecretRequest(owner="alice", path="auth/totp", version=1))
        assert _error(gone.value)[1] == "SECRET_VERSION_DESTROYED"


async def test_sealed_vault_answers_unavailable_until_unsealed(start_vault: StartVault) -> None:
    vault = await start_vault(startup=StartupSecret())
    ops_channel, ops = vault.stub("ops")
    auth_channel, auth = vault.stub("auth")
    async with ops_channel, auth_channel:
        status = await auth.GetSealStatus(pb.GetSealStatusRequest())
        assert status.sealed and status.root_kind == pb.ROOT_KIND_LOCAL
        with pytest.raises(grpc.aio.AioRpcError) as sealed:
            await auth.Encrypt(pb.EncryptRequest(key_name="credentials", plaintext=b"x"))
        assert _error(sealed.value)[:2] == (grpc.StatusCode.UNAVAILABLE, "VAULT_SEALED")
        with pytest.raises(grpc.aio.AioRpcError) as not_ops:
            await auth.Unseal(pb.UnsealRequest(passphrase=PASSPHRASE))
        assert not_ops.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not (
            await ops.Unseal(pb.UnsealRequest(passphrase=PASSPHRASE))
        ).sealed  # first one creates the root
        await ops.CreateKey(pb.CreateKeyRequest(name="credentials", type=pb.KEY_TYPE_AES256_GCM))
        assert (await auth.Encrypt(pb.EncryptRequest(key_name="credentials", plaintext=b"x"))).ciphertext


async def test_wrong_passphrase_and_restart(start_vault: StartVault) -> None:
    first = await start_vault()
    ops_channel, ops = first.stub("ops")
    async with ops_channel:
        await ops.CreateKey(pb.CreateKeyRequest(name="credentials", type=pb.KEY_TYPE_AES256_GCM))
    auth_channel, auth = first.stub("auth")
    async with auth_channel:
        ct = (await auth.Encrypt(pb.EncryptRequest(key_name="credentials", plaintext=b"kept"))).ciphertext
    await first.running.stop(0, drain=0)

    second = await start_vault(startup=StartupSecret())
    ops_channel, ops = second.stub("ops")
    auth_channel, auth = second.stub("auth")
    async with ops_channel, auth_channel:
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await ops.Unseal(pb.UnsealRequest(passphrase="not it"))
        assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await ops.Unseal(pb.UnsealRequest(passphrase=PASSPHRASE))
        assert (
            await auth.Decrypt(pb.DecryptRequest(key_name="credentials", ciphertext=ct))
        ).plaintext == b"kept"


async def test_concurrent_encrypts_over_rpc_survive_rotation(start_vault: StartVault) -> None:
    vault = await start_vault()
    ops_channel, ops = vault.stub("ops")
    auth_channel, auth = vault.stub("auth")
    async with ops_channel, auth_channel:
        await ops.CreateKey(pb.CreateKeyRequest(name="credentials", type=pb.KEY_TYPE_AES256_GCM))

        async def encrypt(i: int) -> tuple[int, str]:
            r = await auth.Encrypt(
                pb.EncryptRequest(key_name="credentials", plaintext=b"v%d" % i, associated_data=b"%d" % i)
            )
            return i, r.ciphertext

        async def rotate() -> None:
            await ops.RotateKey(pb.RotateKeyRequest(name="credentials"))

        sealed: list[tuple[int, str]] = []
        for wave in range(5):  # each wave: 60 encryptions racing one rotation; the next wave starts after it
            results = await asyncio.gather(
                *(encrypt(wave * 60 + i) for i in range(30)),
                rotate(),
                *(encrypt(wave * 60 + i) for i in range(30, 60)),
            )
            wave_sealed = [r for r in results if r is not None]
            # Wave w starts after rotation w-1 finished (version w+1 is current) and races rotation w,
            # so each of its ciphertexts is sealed under version w+1 or w+2, never an older one.
            assert {ct.split(":")[2] for _, ct in wave_sealed} <= {f"v{wave + 1}", f"v{wave + 2}"}
            sealed += wave_sealed
        assert len(sealed) == 300
        assert (await ops.GetKey(pb.GetKeyRequest(name="credentials"))).key.latest_version == 6
        for i, ct in sealed:
            r = await auth.Decrypt(
                pb.DecryptRequest(key_name="credentials", ciphertext=ct, associated_data=b"%d" % i)
            )
            assert r.plaintext == b"v%d" % i


async def test_server_takes_the_passphrase_file_once(
    pki_paths: pki.PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsealed at start-up from TRADEGUARD_KEYVAULT_PASSPHRASE_FILE; afterwards the settings hold no passphrase."""
    monkeypatch.setenv("TRADEGUARD_HOME", str(pki_paths.home))
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PORT", "0")
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_SCRYPT_N", str(2**10))
    secret = pki_paths.home / "vault-passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o600)
    monkeypatch.setenv("TRADEGUARD_KEYVAULT_PASSPHRASE_FILE", str(secret))
    settings = Settings.from_env()
    store = await SERVICE.stores.open(settings.database_url)
    assembly = await SERVICE.build(Wiring(settings, store, pki.trust_domain(pki_paths)))
    vault = assembly.core
    assert isinstance(vault, KeyVault)
    try:
        assert not vault.sealed
        assert settings.startup.take() is None
    finally:
        await vault.close()
        await store.close()
    secret.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        Settings.from_env()


async def test_oversized_rotation_period_is_invalid_argument_not_internal(start_vault: StartVault) -> None:
    vault = await start_vault()
    ops_channel, ops = vault.stub("ops")
    async with ops_channel:
        for seconds in (2**62, 315576000000, 11 * 366 * 86400, 60):
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await ops.CreateKey(
                    pb.CreateKeyRequest(
                        name="k",
                        type=pb.KEY_TYPE_AES256_GCM,
                        auto_rotate_period=duration_pb2.Duration(seconds=seconds),
                    ),
                    timeout=5,
                )
            code, reason, message = _error(bad.value)
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
            assert "auto_rotate_period" in message
        await ops.CreateKey(pb.CreateKeyRequest(name="k", type=pb.KEY_TYPE_AES256_GCM), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await ops.UpdateKeyConfig(
                pb.UpdateKeyConfigRequest(name="k", auto_rotate_period=duration_pb2.Duration(seconds=2**62)),
                timeout=5,
            )
        assert _error(bad.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert "auto_rotate_period" in _error(bad.value)[2]


async def test_hmac_verify_needs_the_hmac_right_over_mtls(start_vault: StartVault) -> None:
    vault = await start_vault()
    ops_channel, ops = vault.stub("ops")
    auth_channel, auth = vault.stub("auth")
    trading_channel, trading = vault.stub("trading")
    async with ops_channel, auth_channel, trading_channel:
        await ops.CreateKey(pb.CreateKeyRequest(name="credentials", type=pb.KEY_TYPE_HMAC_SHA256))
        mac = (await auth.Hmac(pb.HmacRequest(key_name="credentials", data=b"123456"))).mac
        request = pb.VerifyRequest(key_name="credentials", message=b"123456", signature=mac)
        assert (await auth.Verify(request, timeout=5)).valid
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await trading.Verify(request, timeout=5)
        assert _error(denied.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "VAULT_PERMISSION_DENIED")


async def test_retiring_a_version_younger_than_the_freshness_window_is_refused_with_retry_info(
    start_vault: StartVault,
) -> None:
    vault = await start_vault(key_freshness_s=60.0)
    ops_channel, ops = vault.stub("ops")
    async with ops_channel:
        await ops.CreateKey(pb.CreateKeyRequest(name="credentials", type=pb.KEY_TYPE_AES256_GCM), timeout=5)
        await ops.RotateKey(pb.RotateKeyRequest(name="credentials"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ops.UpdateKeyConfig(
                pb.UpdateKeyConfigRequest(name="credentials", min_decryption_version=2), timeout=5
            )
        code, reason, message = _error(refused.value)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "VERSION_TOO_NEW")
        assert "retry in" in message
        retry_delay_s = rich_status(refused.value).retry_delay_s
        assert retry_delay_s is not None and 0 < retry_delay_s <= 60
        key = (await ops.GetKey(pb.GetKeyRequest(name="credentials"), timeout=5)).key
        assert key.min_decryption_version == 1


async def test_each_operation_is_one_log_line_with_what_it_did_and_no_material(
    start_vault: StartVault,
) -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    vault = await start_vault()
    ops_channel, ops = vault.stub("ops")
    auth_channel, auth = vault.stub("auth")
    trading_channel, trading = vault.stub("trading")
    async with ops_channel, auth_channel, trading_channel:
        await ops.CreateKey(pb.CreateKeyRequest(name="credentials", type=pb.KEY_TYPE_AES256_GCM))
        out.truncate(0)
        out.seek(0)
        sealed = await auth.Encrypt(pb.EncryptRequest(key_name="credentials", plaintext=b"p4ssw0rd-material"))
        with pytest.raises(grpc.aio.AioRpcError):
            await trading.Decrypt(pb.DecryptRequest(key_name="credentials", ciphertext=sealed.ciphertext))
    # the refused call's status can reach the client just before the server has written its line
    await eventually(lambda: out.getvalue().count("\n") >= 2)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    encrypt, denied = lines  # one line per RPC, nothing else
    assert (encrypt["event"], encrypt["code"], encrypt["caller"]) == (
        "rpc",
        "OK",
        "spiffe://tradeguard.test/svc/auth",
    )
    assert (encrypt["operation"], encrypt["resource"], encrypt["version"], encrypt["outcome"]) == (
        "keyvault.encrypt",
        "credentials",
        1,
        "ok",
    )
    assert (denied["code"], denied["operation"], denied["outcome"]) == (
        "PERMISSION_DENIED",
        "keyvault.decrypt",
        "permission_denied",
    )
    assert "p4ssw0rd-material" not in out.getvalue() and sealed.ciphertext not in out.getvalue()
