"""Helpers of the auth service's end-to-end tests: the real auth service (as production starts it) beside the real
key vault (the `keyvault` fixture of conftest.py), over mutual TLS; users, TOTP codes and signed requests."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import pyotp
import pytest

from services.auth.service import SERVICE
from services.auth.settings import Settings
from services.keyvault.settings import Settings as KeyVaultSettings
from tests.support import NOT_RECORDED
from tradeguard import signing
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.mesh import pki
from tradeguard.mesh.server import ServerConfig
from tradeguard.testing import RunningService, rich_status, running_service

PASSWORD = "correct horse trading staple"
PLACE_ORDER = "/tradeguard.trading.v1.TradingService/PlaceOrder"
GET_ORDER = "/tradeguard.trading.v1.TradingService/GetOrder"
# Workloads beyond tests/conftest.py's: a firm's trading bot, and a certificate our CA issued to a name that no
# rule lists.
EXTRA_WORKLOADS = ("trading-client", "intruder")

AuthService = RunningService[Settings, Any]


def auth_settings(keyvault: RunningService[KeyVaultSettings, Any], **overrides: Any) -> Settings:
    home = keyvault.paths.home
    settings = Settings(
        server=ServerConfig(name="auth", port=0, home=home, grace_s=1.0),
        database_url=f"sqlite:///{home / 'data' / 'auth.db'}",
        keyvault_target=keyvault.target,
        recording=NOT_RECORDED,
    )
    return replace(settings, **overrides)


@pytest.fixture
async def auth(
    keyvault: RunningService[KeyVaultSettings, Any], pki_paths: pki.PkiPaths
) -> AsyncIterator[AuthService]:
    """The auth service started as production starts it (tradeguard.service.start), on a free port."""
    for name in EXTRA_WORKLOADS:
        pki.issue(pki_paths, name)
    async with running_service(SERVICE, auth_settings(keyvault), pki_paths) as running:
        yield running


def stub(channel: grpc.aio.Channel) -> auth_pb2_grpc.AuthServiceAsyncStub:
    return auth_pb2_grpc.AuthServiceStub(channel)


def status_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str | None]:
    status = rich_status(error)
    return status.code, status.reason


def totp_of(uri: str) -> pyotp.TOTP:
    """The authenticator app's view of an otpauth:// URI."""
    secret = parse_qs(urlparse(uri).query)["secret"][0]
    return pyotp.TOTP(secret)


async def create_user(
    ops: auth_pb2_grpc.AuthServiceAsyncStub, username: str, roles: tuple[str, ...] = ("trader",)
) -> pb.User:
    reply = await ops.CreateUser(
        pb.CreateUserRequest(
            username=username, password=PASSWORD, account_id=f"acct-{username}", roles=roles
        ),
        timeout=10,
    )
    return reply.user


async def enrol(client: auth_pb2_grpc.AuthServiceAsyncStub, username: str) -> tuple[pyotp.TOTP, list[str]]:
    """TOTP enrolment with the code of the current step: the authenticator and the recovery codes."""
    begun = await client.BeginTotpEnrollment(
        pb.BeginTotpEnrollmentRequest(username=username, password=PASSWORD), timeout=10
    )
    totp = totp_of(begun.otpauth_uri)
    confirmed = await client.ConfirmTotpEnrollment(
        pb.ConfirmTotpEnrollmentRequest(username=username, password=PASSWORD, code=totp.now()), timeout=10
    )
    return totp, list(confirmed.recovery_codes)


def next_code(totp: pyotp.TOTP) -> str:
    """The code of the next time step (accepted: ±1 step, and newer than the step enrolment spent)."""
    return totp.at(time.time() + 30)


async def login(client: auth_pb2_grpc.AuthServiceAsyncStub, username: str, totp: pyotp.TOTP) -> pb.TokenPair:
    """Password, then the second factor: the tokens."""
    first = await client.Login(pb.LoginRequest(username=username, password=PASSWORD), timeout=10)
    assert not first.HasField("tokens") and first.mfa_token
    second = await client.VerifyMfa(
        pb.VerifyMfaRequest(mfa_token=first.mfa_token, totp_code=next_code(totp)), timeout=10
    )
    return second.tokens


def signed_request(
    key_id: str,
    secret: str,
    *,
    path: str = PLACE_ORDER,
    body: bytes = b"order",
    source_ip: str = "127.0.0.1",
    permission: str = "orders:write",
    timestamp_ms: int | None = None,
    nonce: str | None = None,
) -> pb.SignedRequest:
    """A request signed with the HMAC secret, as a guard reports it to VerifySignedRequests."""
    stamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    chosen = nonce or secrets.token_urlsafe(24)
    digest = signing.body_digest(body)
    return pb.SignedRequest(
        key_id=key_id,
        timestamp=str(stamp),
        nonce=chosen,
        signature=signing.sign_hmac(secret, key_id, stamp, chosen, path, digest),
        path=path,
        body_sha256=digest,
        source_ip=source_ip,
        required_permission=permission,
    )
