"""KeyVaultService over gRPC: proto ↔ core, nothing else. Errors are raised as DomainErrors.

The caller is the service name of the peer's verified SPIFFE ID (the mesh's authorisation interceptor has
already checked the method allow-list; the core checks the per-key policy).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import code_pb2

from services.keyvault.core import KeyVault
from services.keyvault.errors import DomainError, InvalidArgument
from services.keyvault.model import KeyType, SecretVersionInfo, StoredKey
from tradeguard.keyvault.v1 import keyvault_pb2 as pb
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh.identity import caller_name

Context = Any  # grpc.aio.ServicerContext

_KEY_TYPES = {
    pb.KEY_TYPE_AES256_GCM: KeyType.AES256_GCM,
    pb.KEY_TYPE_HMAC_SHA256: KeyType.HMAC_SHA256,
    pb.KEY_TYPE_ED25519: KeyType.ED25519,
}
_KEY_TYPE_PROTO = {v: k for k, v in _KEY_TYPES.items()}
_ROOT_KINDS = {"local": pb.ROOT_KIND_LOCAL, "pkcs11": pb.ROOT_KIND_PKCS11}


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, us = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=us * 1000)


def _duration(micros: int) -> duration_pb2.Duration:
    seconds, us = divmod(micros, 1_000_000)
    return duration_pb2.Duration(seconds=seconds, nanos=us * 1000)


_MAX_DURATION_S = 3653 * 86400  # 10 years; the core checks the exact bounds of each field


def _micros(duration: duration_pb2.Duration, field_name: str) -> int:
    if duration.seconds < 0 or duration.nanos < 0:
        raise InvalidArgument.field(field_name, "must not be negative")
    if duration.seconds > _MAX_DURATION_S:
        raise InvalidArgument.field(field_name, "must be at most 10 years")
    return duration.seconds * 1_000_000 + duration.nanos // 1000


def key_to_proto(key: StoredKey) -> pb.Key:
    c = key.config
    return pb.Key(
        name=c.name,
        type=_KEY_TYPE_PROTO[c.type],
        latest_version=key.latest.version,
        min_decryption_version=c.min_decryption_version,
        auto_rotate_period=_duration(c.auto_rotate_period_us),
        deletion_allowed=c.deletion_allowed,
        create_time=_timestamp(c.create_us),
        update_time=_timestamp(c.update_us),
        versions=[
            pb.KeyVersion(version=v.version, create_time=_timestamp(v.create_us), public_key=v.public_key)
            for v in key.versions
        ],
    )


def secret_to_proto(info: SecretVersionInfo) -> pb.SecretVersion:
    out = pb.SecretVersion(
        owner=info.owner, path=info.path, version=info.version, create_time=_timestamp(info.create_us)
    )
    if info.destroyed:
        out.destroy_time.CopyFrom(_timestamp(info.destroy_us))
    return out


def _item_error(error: DomainError) -> pb.ItemError:
    return pb.ItemError(code=getattr(code_pb2, error.code.name), reason=error.reason, message=error.message)


class KeyVaultServicer(keyvault_pb2_grpc.KeyVaultServiceServicer):
    def __init__(self, vault: KeyVault, trust_domain: str) -> None:
        self._vault = vault
        self._trust_domain = trust_domain

    def _caller(self, context: Context) -> str | None:
        return caller_name(context, self._trust_domain)

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Context) -> pb.CreateKeyResponse:
        key_type = _KEY_TYPES.get(request.type)
        if key_type is None:
            raise InvalidArgument.field("type", "must be one of AES256_GCM, HMAC_SHA256, ED25519")
        key = await self._vault.create_key(
            self._caller(context),
            request.name,
            key_type,
            auto_rotate_period_us=_micros(request.auto_rotate_period, "auto_rotate_period"),
            deletion_allowed=request.deletion_allowed,
        )
        return pb.CreateKeyResponse(key=key_to_proto(key))

    async def GetKey(self, request: pb.GetKeyRequest, context: Context) -> pb.GetKeyResponse:
        return pb.GetKeyResponse(
            key=key_to_proto(await self._vault.get_key(self._caller(context), request.name))
        )

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        keys, token = await self._vault.list_keys(
            self._caller(context), request.page_size, request.page_token
        )
        return pb.ListKeysResponse(keys=[key_to_proto(k) for k in keys], next_page_token=token)

    async def RotateKey(self, request: pb.RotateKeyRequest, context: Context) -> pb.RotateKeyResponse:
        key = await self._vault.rotate_key(self._caller(context), request.name)
        return pb.RotateKeyResponse(key=key_to_proto(key))

    async def UpdateKeyConfig(
        self, request: pb.UpdateKeyConfigRequest, context: Context
    ) -> pb.UpdateKeyConfigResponse:
        key = await self._vault.update_key_config(
            self._caller(context),
            request.name,
            min_decryption_version=(
                request.min_decryption_version if request.HasField("min_decryption_version") else None
            ),
            auto_rotate_period_us=(
                _micros(request.auto_rotate_period, "auto_rotate_period")
                if request.HasField("auto_rotate_period")
                else None
            ),
            deletion_allowed=request.deletion_allowed if request.HasField("deletion_allowed") else None,
        )
        return pb.UpdateKeyConfigResponse(key=key_to_proto(key))

    async def DeleteKey(self, request: pb.DeleteKeyRequest, context: Context) -> pb.DeleteKeyResponse:
        await self._vault.delete_key(self._caller(context), request.name)
        return pb.DeleteKeyResponse()

    async def Encrypt(self, request: pb.EncryptRequest, context: Context) -> pb.EncryptResponse:
        ciphertext = await self._vault.encrypt(
            self._caller(context), request.key_name, request.plaintext, request.associated_data
        )
        return pb.EncryptResponse(ciphertext=ciphertext)

    async def Decrypt(self, request: pb.DecryptRequest, context: Context) -> pb.DecryptResponse:
        plaintext = await self._vault.decrypt(
            self._caller(context), request.key_name, request.ciphertext, request.associated_data
        )
        return pb.DecryptResponse(plaintext=plaintext)

    async def BatchEncrypt(
        self, request: pb.BatchEncryptRequest, context: Context
    ) -> pb.BatchEncryptResponse:
        results = await self._vault.batch_encrypt(
            self._caller(context), request.key_name, [(i.plaintext, i.associated_data) for i in request.items]
        )
        return pb.BatchEncryptResponse(
            results=[
                pb.BatchEncryptResult(error=_item_error(r))
                if isinstance(r, DomainError)
                else pb.BatchEncryptResult(ciphertext=r)
                for r in results
            ]
        )

    async def BatchDecrypt(
        self, request: pb.BatchDecryptRequest, context: Context
    ) -> pb.BatchDecryptResponse:
        results = await self._vault.batch_decrypt(
            self._caller(context),
            request.key_name,
            [(i.ciphertext, i.associated_data) for i in request.items],
        )
        return pb.BatchDecryptResponse(
            results=[
                pb.BatchDecryptResult(error=_item_error(r))
                if isinstance(r, DomainError)
                else pb.BatchDecryptResult(plaintext=r)
                for r in results
            ]
        )

    async def Rewrap(self, request: pb.RewrapRequest, context: Context) -> pb.RewrapResponse:
        ciphertext = await self._vault.rewrap(
            self._caller(context), request.key_name, request.ciphertext, request.associated_data
        )
        return pb.RewrapResponse(ciphertext=ciphertext)

    async def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: Context
    ) -> pb.GenerateDataKeyResponse:
        data_key = await self._vault.generate_data_key(
            self._caller(context),
            request.key_name,
            request.associated_data,
            include_plaintext=request.format != pb.DATA_KEY_FORMAT_WRAPPED_ONLY,
        )
        return pb.GenerateDataKeyResponse(plaintext=data_key.plaintext or b"", wrapped_key=data_key.wrapped)

    async def Sign(self, request: pb.SignRequest, context: Context) -> pb.SignResponse:
        signature = await self._vault.sign(self._caller(context), request.key_name, request.message)
        return pb.SignResponse(signature=signature)

    async def Verify(self, request: pb.VerifyRequest, context: Context) -> pb.VerifyResponse:
        valid = await self._vault.verify(
            self._caller(context), request.key_name, request.message, request.signature
        )
        return pb.VerifyResponse(valid=valid)

    async def Hmac(self, request: pb.HmacRequest, context: Context) -> pb.HmacResponse:
        return pb.HmacResponse(
            mac=await self._vault.hmac(self._caller(context), request.key_name, request.data)
        )

    async def PutSecret(self, request: pb.PutSecretRequest, context: Context) -> pb.PutSecretResponse:
        info = await self._vault.put_secret(
            self._caller(context),
            request.owner,
            request.path,
            request.value,
            cas_version=request.cas_version if request.HasField("cas_version") else None,
        )
        return pb.PutSecretResponse(version=secret_to_proto(info))

    async def GetSecret(self, request: pb.GetSecretRequest, context: Context) -> pb.GetSecretResponse:
        value, info = await self._vault.get_secret(
            self._caller(context), request.owner, request.path, request.version
        )
        return pb.GetSecretResponse(value=value, version=secret_to_proto(info))

    async def ListSecretVersions(
        self, request: pb.ListSecretVersionsRequest, context: Context
    ) -> pb.ListSecretVersionsResponse:
        versions = await self._vault.list_secret_versions(self._caller(context), request.owner, request.path)
        return pb.ListSecretVersionsResponse(versions=[secret_to_proto(v) for v in versions])

    async def DestroySecretVersion(
        self, request: pb.DestroySecretVersionRequest, context: Context
    ) -> pb.DestroySecretVersionResponse:
        await self._vault.destroy_secret_version(
            self._caller(context), request.owner, request.path, request.version
        )
        return pb.DestroySecretVersionResponse()

    async def Unseal(self, request: pb.UnsealRequest, context: Context) -> pb.UnsealResponse:
        status = await self._vault.unseal(self._caller(context), request.passphrase)
        return pb.UnsealResponse(sealed=status.sealed)

    async def GetSealStatus(
        self, request: pb.GetSealStatusRequest, context: Context
    ) -> pb.GetSealStatusResponse:
        status = self._vault.seal_status()
        return pb.GetSealStatusResponse(sealed=status.sealed, root_kind=_ROOT_KINDS[status.root_kind])
