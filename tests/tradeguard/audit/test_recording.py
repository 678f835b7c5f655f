"""Services recording their own security events (tradeguard.audit.recording) in the REAL audit service: the
session's auth service and key vault (processes, tests/support.py) record logins, failed logins, API key creation
and revocation, key creation and decryptions, read back as `ops` through Query — with no password, secret or
plaintext in the stored bytes; the audit service's own calls to the vault are not recorded; with the audit
service unreachable a key vault answers a successful call UNAVAILABLE (OUTCOME_UNKNOWN, no plaintext released)
and keeps a refusal as it was; the settings."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.keyvault.service import SERVICE as KEYVAULT
from tests.services.auth.test_ext_authz import CLIENT_IP, envoy_check
from tests.support import AUTH_PASSWORD, AuthServices, create_api_key, create_auth_user, free_port
from tests.support_auth import keyvault_settings
from tradeguard.audit.recording import OUTCOME_UNKNOWN, RecordingSettings
from tradeguard.audit.v1 import audit_pb2 as pb
from tradeguard.audit.v1 import audit_pb2_grpc
from tradeguard.auth.v1 import auth_pb2 as auth_pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.keyvault.v1 import keyvault_pb2 as kv
from tradeguard.keyvault.v1 import keyvault_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.settings import Env
from tradeguard.testing import RunningService, rich_status, running_service

AUTH = "/tradeguard.auth.v1.AuthService"
VAULT = "/tradeguard.keyvault.v1.KeyVaultService"


def _spiffe(paths: pki.PkiPaths, workload: str) -> str:
    return f"spiffe://{pki.trust_domain(paths)}/svc/{workload}"


def _since(time_us: int) -> Timestamp:
    return Timestamp(seconds=time_us // 1_000_000, nanos=time_us % 1_000_000 * 1000)


async def recorded(auth: AuthServices, method: str, since_us: int) -> list[pb.StoredEntry]:
    """Every entry of `method` recorded since `since_us`, read from the session's audit service as ops."""
    out: list[pb.StoredEntry] = []
    token = ""
    async with auth.audit_channel("ops") as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        while True:
            reply = await stub.Query(
                pb.QueryRequest(method=method, start_time=_since(since_us), page_size=1000, page_token=token),
                timeout=10,
            )
            out.extend(reply.entries)
            token = reply.next_page_token
            if not token:
                return out


def _now_us() -> int:
    return time.time_ns() // 1000


# --- the auth service ------------------------------------------------------------------------------------------


async def test_logins_and_api_keys_are_recorded_without_a_secret(auth_services: AuthServices) -> None:
    start = _now_us()
    user = await create_auth_user(auth_services, roles=("viewer",))  # no second factor due
    async with auth_services.channel("ops") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Login(
                auth_pb.LoginRequest(username=user.username, password="wrong-password-1"), timeout=10
            )
        assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the refusal stands, as it was
        tokens = await stub.Login(
            auth_pb.LoginRequest(username=user.username, password=AUTH_PASSWORD), timeout=10
        )
    key = await create_api_key(auth_services, user.user_id, "orders:read")
    async with auth_services.channel("ops") as channel:
        await auth_pb2_grpc.AuthServiceStub(channel).RevokeApiKey(
            auth_pb.RevokeApiKeyRequest(key_id=key.key_id), timeout=10
        )

    # every answer above was released only once its event was durable: the events are there now
    logins = [
        e
        for e in await recorded(auth_services, f"{AUTH}/Login", start)
        if e.entry.event.principal == user.username
    ]
    assert sorted(e.entry.event.outcome for e in logins) == [pb.OUTCOME_OK, pb.OUTCOME_DENIED_AUTHENTICATION]
    for stored in logins:
        event = stored.entry.event
        assert stored.entry.recorder == _spiffe(auth_services.paths, "auth")
        assert event.caller == _spiffe(auth_services.paths, "ops") and event.source_ip == "127.0.0.1"
        assert event.action == "login" and event.resource == user.username
        assert event.clock.sync in (pb.CLOCK_SYNC_SYNCHRONIZED, pb.CLOCK_SYNC_UNSYNCHRONIZED)
    denied = next(e.entry.event for e in logins if e.entry.event.outcome == pb.OUTCOME_DENIED_AUTHENTICATION)
    assert (
        denied.status_code == "UNAUTHENTICATED" and denied.details["cause"]
    )  # what was wrong, for forensics
    created = [
        e.entry.event
        for e in await recorded(auth_services, f"{AUTH}/CreateApiKey", start)
        if e.entry.event.api_key_id == key.key_id
    ]
    assert [(e.action, e.outcome, e.resource) for e in created] == [
        ("api_key.create", pb.OUTCOME_OK, user.user_id)
    ]
    revoked = [
        e.entry.event
        for e in await recorded(auth_services, f"{AUTH}/RevokeApiKey", start)
        if e.entry.event.resource == key.key_id
    ]
    assert [(e.action, e.outcome) for e in revoked] == [("api_key.revoke", pb.OUTCOME_OK)]

    stored_bytes = b"".join(
        e.entry_bytes for e in (*logins, *await recorded(auth_services, f"{AUTH}/CreateApiKey", start))
    )
    assert key.secret is not None
    for secret in (
        AUTH_PASSWORD,
        "wrong-password-1",
        key.secret,
        tokens.tokens.access_token,
        tokens.tokens.refresh_token,
    ):
        assert secret.encode() not in stored_bytes


async def test_a_request_refused_at_the_edge_is_recorded_with_the_clients_address(
    auth_services: AuthServices,
) -> None:
    start = _now_us()
    claimed = f"tgk_claimed{secrets.token_hex(8)}"
    path = f"/tradeguard.trading.v1.TradingService/ListOrders?probe={secrets.token_hex(4)}"
    request_id = f"edge-{secrets.token_hex(6)}"
    check = envoy_check("GET", path, {"x-tg-key": claimed, "x-request-id": request_id})
    pki.issue(auth_services.paths, "edge")
    async with auth_services.channel("edge") as channel:
        answer = await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check, timeout=10)
    assert answer.denied_response.status.code == 401  # the refusal stands, as it was

    (event,) = [e.entry.event for e in await recorded(auth_services, path, start)]
    assert (event.outcome, event.status_code, event.action) == (
        pb.OUTCOME_DENIED_AUTHENTICATION,
        "UNAUTHENTICATED",
        "edge.authorize",
    )
    assert (event.api_key_id, event.source_ip, event.request_id) == (claimed, CLIENT_IP, request_id)
    assert event.caller == _spiffe(auth_services.paths, "edge") and event.details["cause"]


# --- the key vault ---------------------------------------------------------------------------------------------


async def test_key_creation_and_decryptions_are_recorded_but_not_the_audit_services_own_calls(
    auth_services: AuthServices,
) -> None:
    start = _now_us()
    name = f"test/recorded-{secrets.token_hex(4)}"
    plaintext = b"recorded plaintext " + secrets.token_bytes(8).hex().encode()
    async with auth_services.vault_channel("ops") as ops, auth_services.vault_channel("auth") as auth:
        await keyvault_pb2_grpc.KeyVaultServiceStub(ops).CreateKey(
            kv.CreateKeyRequest(name=name, type=kv.KEY_TYPE_AES256_GCM), timeout=10
        )
        vault = keyvault_pb2_grpc.KeyVaultServiceStub(auth)
        sealed = await vault.Encrypt(
            kv.EncryptRequest(key_name="credentials", plaintext=plaintext), timeout=10
        )
        opened = await vault.Decrypt(
            kv.DecryptRequest(key_name="credentials", ciphertext=sealed.ciphertext), timeout=10
        )
        assert opened.plaintext == plaintext
    async with auth_services.vault_channel("audit") as audit:
        with pytest.raises(
            grpc.aio.AioRpcError
        ):  # the audit workload may not decrypt: refused, and unrecorded
            await keyvault_pb2_grpc.KeyVaultServiceStub(audit).Decrypt(
                kv.DecryptRequest(key_name="credentials", ciphertext=sealed.ciphertext), timeout=10
            )

    creates = [
        e.entry.event
        for e in await recorded(auth_services, f"{VAULT}/CreateKey", start)
        if e.entry.event.resource == name
    ]
    assert [(e.action, e.outcome, e.caller) for e in creates] == [
        ("key.create", pb.OUTCOME_OK, _spiffe(auth_services.paths, "ops"))
    ]
    decrypts = await recorded(auth_services, f"{VAULT}/Decrypt", start)
    mine = [e.entry.event for e in decrypts if e.entry.event.caller == _spiffe(auth_services.paths, "auth")]
    assert any(
        e.action == "key.decrypt" and e.resource == "credentials" and e.outcome == pb.OUTCOME_OK for e in mine
    )
    assert not [e for e in decrypts if e.entry.event.caller == _spiffe(auth_services.paths, "audit")]
    assert plaintext not in b"".join(e.entry_bytes for e in decrypts)
    encrypts = await recorded(auth_services, f"{VAULT}/Encrypt", start)
    assert not encrypts  # encryption reveals nothing: not a security event


@pytest.fixture
async def vault_without_audit(pki_paths: pki.PkiPaths) -> AsyncIterator[RunningService[Any, Any]]:
    """A key vault whose audit service is unreachable (nothing listens on its target)."""
    nowhere = RecordingSettings(target=f"127.0.0.1:{free_port()}")
    settings = keyvault_settings(pki_paths.home, secrets.token_urlsafe(16), recording=nowhere)
    for name in ("auth", "trading"):
        pki.issue(pki_paths, name)
    async with running_service(KEYVAULT, settings, pki_paths) as vault:
        yield vault


async def test_without_the_audit_service_nothing_is_released_unrecorded(
    vault_without_audit: RunningService[Any, Any],
) -> None:
    async with vault_without_audit.channel("ops") as ops, vault_without_audit.channel("trading") as trading:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await keyvault_pb2_grpc.KeyVaultServiceStub(ops).CreateKey(
                kv.CreateKeyRequest(name="credentials", type=kv.KEY_TYPE_AES256_GCM), timeout=10
            )
        status = rich_status(failed.value)
        assert (status.code, status.reason) == (grpc.StatusCode.UNAVAILABLE, OUTCOME_UNKNOWN)
        # a refusal stays the refusal it was (never turned into something else, never into a success)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await keyvault_pb2_grpc.KeyVaultServiceStub(trading).CreateKey(
                kv.CreateKeyRequest(name="other", type=kv.KEY_TYPE_AES256_GCM), timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # the key was created (its outcome was reported unknown, not failed): a decryption under it is not released
        sealed = await keyvault_pb2_grpc.KeyVaultServiceStub(trading).Encrypt(
            kv.EncryptRequest(key_name="credentials", plaintext=b"never released"), timeout=10
        )
    async with vault_without_audit.channel("auth") as auth:
        with pytest.raises(grpc.aio.AioRpcError) as withheld:
            await keyvault_pb2_grpc.KeyVaultServiceStub(auth).Decrypt(
                kv.DecryptRequest(key_name="credentials", ciphertext=sealed.ciphertext), timeout=10
            )
    assert rich_status(withheld.value).reason == OUTCOME_UNKNOWN


# --- settings --------------------------------------------------------------------------------------------------


def test_settings_default_on_at_the_registry_port_and_read_from_the_prefix() -> None:
    assert RecordingSettings() == RecordingSettings(True, "127.0.0.1:50053", "audit")
    assert RecordingSettings.read(Env("TG_X", {})) == RecordingSettings()
    read = RecordingSettings.read(
        Env(
            "TG_X",
            {"TG_X_AUDIT": "false", "TG_X_AUDIT_TARGET": "10.0.0.5:7000", "TG_X_AUDIT_SERVER_NAME": "a2"},
        )
    )
    assert read == RecordingSettings(False, "10.0.0.5:7000", "a2")
