"""The auth service end to end over mutual TLS: the real service (as production starts it) on the real key vault.

Users: create (ops) → TOTP enrolment → login → second factor → tokens (a JWT the JWKS verifies, bound to the
caller's certificate) → refresh → the spent refresh token reused: refused, its whole family revoked, and the
revocation streamed to the guards. API keys: create → a signed request verified → replay refused → revoke →
WatchRevocations delivers it → refused. The policy: who may call what; errors as the contract states them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time

import grpc
import jwt
import pytest
from google.protobuf import duration_pb2

from services.auth import peer
from tests.services.auth.auth_support import (
    GET_ORDER,
    PASSWORD,
    AuthService,
    auth,
    create_user,
    enrol,
    login,
    signed_request,
    status_of,
    stub,
)
from tradeguard.auth.v1 import auth_pb2 as pb
from tradeguard.auth.v1 import auth_pb2_grpc
from tradeguard.testing import LogCapture, rich_status

__all__ = ["auth"]  # the fixture, imported for pytest

U = grpc.StatusCode.UNAUTHENTICATED


def thumbprint_of(auth_service: AuthService, workload: str) -> str:
    pem = auth_service.paths.cert(workload).read_text()
    der = ssl.PEM_cert_to_DER_cert(pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


async def next_revocation(
    stream: grpc.aio.UnaryStreamCall[pb.WatchRevocationsRequest, pb.WatchRevocationsResponse],
) -> pb.WatchRevocationsResponse:
    """The next message that revokes something (heartbeats skipped)."""
    while True:
        message = await asyncio.wait_for(stream.read(), 10)
        assert isinstance(message, pb.WatchRevocationsResponse)
        if message.WhichOneof("revoked") is not None:
            return message


async def test_login_mfa_tokens_refresh_and_reuse_revokes_the_family(auth: AuthService) -> None:
    async with auth.channel("ops") as ops_channel, auth.channel("trading") as guard_channel:
        ops, guard = stub(ops_channel), stub(guard_channel)
        user = await create_user(ops, "alice")
        assert (
            user.user_id.startswith("usr_")
            and user.account_id == "acct-alice"
            and list(user.roles) == ["trader"]
        )
        assert user.mfa_required and not user.mfa_enrolled and not user.locked
        # A trader may trade, so a second factor is due: no tokens before enrolment.
        with pytest.raises(grpc.aio.AioRpcError) as no_mfa:
            await ops.Login(pb.LoginRequest(username="alice", password=PASSWORD), timeout=10)
        assert status_of(no_mfa.value) == (grpc.StatusCode.FAILED_PRECONDITION, "MFA_ENROLLMENT_REQUIRED")
        totp, recovery_codes = await enrol(ops, "alice")
        assert len(recovery_codes) >= 8
        assert (await ops.GetUser(pb.GetUserRequest(user_id=user.user_id), timeout=10)).user.mfa_enrolled

        stream = guard.WatchRevocations(pb.WatchRevocationsRequest(since_sequence=0), timeout=60)
        await asyncio.wait_for(stream.initial_metadata(), 10)  # the stream is up before anything is revoked

        tokens = await login(ops, "alice", totp)
        assert tokens.access_token_expires_in.seconds == 300 and tokens.refresh_token.startswith("tgr_")
        jwks = json.loads((await guard.GetJwks(pb.GetJwksRequest(), timeout=10)).jwks_json)
        header = jwt.get_unverified_header(tokens.access_token)
        assert header["typ"] == "at+jwt" and header["alg"] == "EdDSA" and header["kid"] == "auth/jwt:v1"
        key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == header["kid"]))
        claims = jwt.decode(
            tokens.access_token, key, algorithms=["EdDSA"], audience="tradeguard", issuer="tradeguard-auth"
        )
        assert claims["sub"] == user.user_id and claims["acct"] == "acct-alice"
        assert set(claims["scope"].split()) == {"orders:read", "orders:write"} and claims["amr"] == [
            "pwd",
            "otp",
        ]
        # RFC 8705: bound to the certificate the client logged in with (ops's).
        assert claims["cnf"] == {"x5t#S256": thumbprint_of(auth, "ops")}

        refreshed = await ops.RefreshToken(
            pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10
        )
        fresh = refreshed.tokens
        assert fresh.refresh_token != tokens.refresh_token
        family = jwt.decode(fresh.access_token, options={"verify_signature": False})["fam"]
        assert family == claims["fam"]  # the same family, rotated

        # The spent token again: refused, and the whole family revoked (the fresh refresh token too).
        with pytest.raises(grpc.aio.AioRpcError) as reused:
            await ops.RefreshToken(pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10)
        assert status_of(reused.value) == (U, "UNAUTHENTICATED")
        assert reused.value.details() == "authentication failed"  # the cause is not sent
        with pytest.raises(grpc.aio.AioRpcError) as family_gone:
            await ops.RefreshToken(pb.RefreshTokenRequest(refresh_token=fresh.refresh_token), timeout=10)
        assert family_gone.value.code() == U
        revoked = await next_revocation(stream)
        assert revoked.WhichOneof("revoked") == "family_id" and revoked.family_id == family
        assert revoked.revoke_time.seconds >= claims["iat"] and revoked.expire_time.seconds > time.time()
        stream.cancel()


async def test_a_refresh_from_another_certificate_revokes_the_family(auth: AuthService) -> None:
    async with auth.channel("ops") as ops_channel, auth.channel("trading-client") as bot_channel:
        ops, bot = stub(ops_channel), stub(bot_channel)
        await create_user(ops, "bob")
        totp, _ = await enrol(bot, "bob")
        tokens = await login(bot, "bob", totp)
        with pytest.raises(
            grpc.aio.AioRpcError
        ) as stolen:  # the token leaked to a holder of another certificate
            await ops.RefreshToken(pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10)
        assert stolen.value.code() == U
        with pytest.raises(grpc.aio.AioRpcError) as after:
            await bot.RefreshToken(pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10)
        assert after.value.code() == U


async def test_recovery_code_login_and_logout(auth: AuthService) -> None:
    async with auth.channel("edge") as edge_channel, auth.channel("ops") as ops_channel:
        edge, ops = stub(edge_channel), stub(ops_channel)
        await create_user(ops, "carol")
        _, codes = await enrol(edge, "carol")
        first = await edge.Login(pb.LoginRequest(username="carol", password=PASSWORD), timeout=10)
        assert first.mfa_token_expires_in.seconds == 300
        tokens = (
            await edge.VerifyMfa(
                pb.VerifyMfaRequest(mfa_token=first.mfa_token, recovery_code=codes[0]), timeout=10
            )
        ).tokens
        claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
        assert "cnf" not in claims  # through the edge: its certificate is not the client's
        again = await edge.Login(pb.LoginRequest(username="carol", password=PASSWORD), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as spent:  # a recovery code works once
            await edge.VerifyMfa(
                pb.VerifyMfaRequest(mfa_token=again.mfa_token, recovery_code=codes[0]), timeout=10
            )
        assert spent.value.code() == U
        await edge.Logout(pb.LogoutRequest(refresh_token=tokens.refresh_token), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as out:
            await edge.RefreshToken(pb.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10)
        assert out.value.code() == U


async def test_unknown_user_and_wrong_password_are_one_answer(auth: AuthService) -> None:
    async with auth.channel("ops") as ops_channel, auth.channel("trading-client") as bot_channel:
        ops, bot = stub(ops_channel), stub(bot_channel)
        await create_user(ops, "dave", roles=("viewer",))  # no trading permission: no second factor due
        ok = await bot.Login(pb.LoginRequest(username="dave", password=PASSWORD), timeout=10)
        assert ok.HasField("tokens") and not ok.mfa_token
        answers = set()
        for username, password in (("dave", "wrong password entirely"), ("nobody-here", PASSWORD)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await bot.Login(pb.LoginRequest(username=username, password=password), timeout=10)
            answers.add((refused.value.code(), refused.value.details(), status_of(refused.value)[1]))
        assert answers == {(U, "authentication failed", "UNAUTHENTICATED")}
        with pytest.raises(grpc.aio.AioRpcError) as made_up:  # an mfa_token nobody was given
            await bot.VerifyMfa(pb.VerifyMfaRequest(mfa_token="x" * 43, totp_code="000000"), timeout=10)
        assert status_of(made_up.value) == (U, "UNAUTHENTICATED")


async def test_roles_lockout_and_admin_rpcs(auth: AuthService) -> None:
    async with auth.channel("ops") as ops_channel, auth.channel("trading-client") as bot_channel:
        ops, bot = stub(ops_channel), stub(bot_channel)
        roles = {
            r.name: set(r.permissions) for r in (await ops.ListRoles(pb.ListRolesRequest(), timeout=10)).roles
        }
        assert roles["trader"] == {"orders:read", "orders:write"} and roles["viewer"] == {"orders:read"}
        role = await ops.SetRolePermissions(
            pb.SetRolePermissionsRequest(role="auditor", permissions=["orders:read"]), timeout=10
        )
        assert role.role.name == "auditor" and list(role.role.permissions) == ["orders:read"]
        user = await create_user(ops, "erin", roles=("viewer",))
        changed = await ops.SetUserRoles(
            pb.SetUserRolesRequest(user_id=user.user_id, roles=["auditor"]), timeout=10
        )
        assert list(changed.user.roles) == ["auditor"] and not changed.user.mfa_required
        for _ in range(25):  # past the pair's and the account's thresholds, from one address
            with pytest.raises(grpc.aio.AioRpcError):
                await bot.Login(
                    pb.LoginRequest(username="erin", password="not the password at all"), timeout=10
                )
        with pytest.raises(grpc.aio.AioRpcError) as locked:  # the right password, locked out: the same answer
            await bot.Login(pb.LoginRequest(username="erin", password=PASSWORD), timeout=10)
        assert status_of(locked.value) == (U, "UNAUTHENTICATED")
        await ops.UnlockUser(pb.UnlockUserRequest(user_id=user.user_id), timeout=10)
        assert (await bot.Login(pb.LoginRequest(username="erin", password=PASSWORD), timeout=10)).HasField(
            "tokens"
        )


async def test_api_key_verify_replay_revoke_and_the_revocation_stream(auth: AuthService) -> None:
    async with auth.channel("ops") as ops_channel, auth.channel("trading") as guard_channel:
        ops, guard = stub(ops_channel), stub(guard_channel)
        user = await create_user(ops, "frank")
        created = await ops.CreateApiKey(
            pb.CreateApiKeyRequest(
                user_id=user.user_id,
                kind=pb.API_KEY_KIND_HMAC,
                scopes=["orders:write"],
                ip_allow_list=["127.0.0.0/8"],
                tier="pro",
                lifetime=duration_pb2.Duration(seconds=30 * 86400),
                label="bot 1",
            ),
            timeout=10,
        )
        key, secret = created.key, created.secret
        assert (
            key.key_id.startswith("tgk_")
            and secret.startswith("tgs_")
            and key.state == pb.API_KEY_STATE_ACTIVE
        )
        assert key.account_id == "acct-frank" and key.tier == "pro" and list(key.scopes) == ["orders:write"]
        assert key.expire_time.seconds - key.create_time.seconds == 30 * 86400
        listed = await ops.ListApiKeys(pb.ListApiKeysRequest(user_id=user.user_id), timeout=10)
        assert [k.key_id for k in listed.keys] == [key.key_id] and secret not in str(listed)

        stream = guard.WatchRevocations(pb.WatchRevocationsRequest(since_sequence=0), timeout=60)
        await asyncio.wait_for(stream.initial_metadata(), 10)
        good = signed_request(key.key_id, secret)
        reply = await guard.VerifySignedRequests(
            pb.VerifySignedRequestsRequest(
                requests=[
                    good,
                    good,  # the same nonce again: a replay
                    signed_request(key.key_id, secret, permission="orders:read"),  # authentic, not in scope
                    signed_request(key.key_id, "tgs_" + "A" * 43),  # a wrong secret
                    signed_request(key.key_id, secret, source_ip="203.0.113.9"),  # outside the allow-list
                    signed_request(
                        key.key_id, secret, timestamp_ms=int(time.time() * 1000) - 60_000
                    ),  # stale
                ]
            ),
            timeout=10,
        )
        first, *rest = reply.results
        assert first.principal.user_id == user.user_id and first.principal.key_id == key.key_id
        assert first.principal.account_id == "acct-frank" and first.principal.tier == "pro"
        assert list(first.principal.scopes) == ["orders:write"]
        replay, denied, *refused = rest
        assert not replay.HasField("principal") and not replay.permission_denied
        assert denied.permission_denied and not denied.HasField("principal")
        assert all(not r.HasField("principal") and not r.permission_denied for r in refused)

        rotated = await ops.RotateApiKey(pb.RotateApiKeyRequest(key_id=key.key_id), timeout=10)
        assert (
            rotated.secret != secret and rotated.key.previous_secret_expire_time.seconds > time.time() + 86000
        )
        both = await guard.VerifySignedRequests(
            pb.VerifySignedRequestsRequest(
                requests=[signed_request(key.key_id, secret), signed_request(key.key_id, rotated.secret)]
            ),
            timeout=10,
        )
        assert all(r.HasField("principal") for r in both.results)  # the old secret within its grace period

        await ops.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=key.key_id), timeout=10)
        revoked = await next_revocation(stream)
        assert revoked.WhichOneof("revoked") == "key_id" and revoked.key_id == key.key_id
        after = await guard.VerifySignedRequests(
            pb.VerifySignedRequestsRequest(requests=[signed_request(key.key_id, rotated.secret)]), timeout=10
        )
        assert not after.results[0].HasField("principal")
        listed = await ops.ListApiKeys(pb.ListApiKeysRequest(user_id=user.user_id), timeout=10)
        assert listed.keys[0].state == pb.API_KEY_STATE_REVOKED
        stream.cancel()

        # A guard that resumes from an earlier sequence gets what it missed, at or after that sequence.
        resumed = guard.WatchRevocations(
            pb.WatchRevocationsRequest(since_sequence=revoked.sequence), timeout=60
        )
        again = await next_revocation(resumed)
        assert again.sequence == revoked.sequence and again.key_id == key.key_id
        resumed.cancel()


async def test_revocations_by_operators_reach_the_stream(auth: AuthService) -> None:
    async with auth.channel("ops") as ops_channel, auth.channel("monitor") as monitor_channel:
        ops, monitor = stub(ops_channel), stub(monitor_channel)
        user = await create_user(ops, "gina", roles=("viewer",))
        stream = monitor.WatchRevocations(pb.WatchRevocationsRequest(), timeout=60)
        await monitor.RevokeTokens(
            pb.RevokeTokensRequest(jti="some-token-id"), timeout=10
        )  # the monitor may revoke
        await ops.RevokeTokens(pb.RevokeTokensRequest(user_id=user.user_id), timeout=10)
        first, second = await next_revocation(stream), await next_revocation(stream)
        assert (first.jti, second.user_id) == ("some-token-id", user.user_id)
        assert second.sequence == first.sequence + 1
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await ops.RevokeTokens(pb.RevokeTokensRequest(), timeout=10)
        assert status_of(empty.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_cancelled_stream_ends_cleanly_and_heartbeats_flow(auth: AuthService) -> None:
    auth.running.assembly.servicer._heartbeat_s = 0.05  # type: ignore[attr-defined]
    async with auth.channel("trading") as channel:
        guard = stub(channel)
        stream = guard.WatchRevocations(pb.WatchRevocationsRequest(since_sequence=0), timeout=60)
        heartbeat = await asyncio.wait_for(stream.read(), 10)
        assert isinstance(heartbeat, pb.WatchRevocationsResponse) and heartbeat.WhichOneof("revoked") is None
        stream.cancel()
        assert stream.cancelled()
        # The service goes on serving (the cancelled handler ended; nothing leaked into other calls).
        assert (await guard.GetJwks(pb.GetJwksRequest(), timeout=10)).jwks_json.startswith('{"keys"')


async def test_validation_names_the_field(auth: AuthService) -> None:
    async with auth.channel("ops") as channel:
        ops = stub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await ops.CreateUser(
                pb.CreateUserRequest(username="x", password="short", account_id="", roles=["nope"]),
                timeout=10,
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        named = {v.field for v in rich_status(bad.value).field_violations}
        assert {"username", "password", "account_id", "roles[0]"} <= named
        user = await create_user(ops, "hank", roles=("viewer",))
        for request, field in (
            (pb.CreateApiKeyRequest(user_id=user.user_id, scopes=["orders:read"]), "kind"),
            (
                pb.CreateApiKeyRequest(
                    user_id=user.user_id, kind=pb.API_KEY_KIND_ED25519, scopes=["orders:read"]
                ),
                "ed25519_public_key",
            ),
            (
                pb.CreateApiKeyRequest(
                    user_id=user.user_id,
                    kind=pb.API_KEY_KIND_HMAC,
                    scopes=["orders:read"],
                    lifetime=duration_pb2.Duration(seconds=-1),
                ),
                "lifetime",
            ),
            (pb.CreateApiKeyRequest(user_id="usr_nope", kind=pb.API_KEY_KIND_HMAC), "user_id"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ops.CreateApiKey(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert field in {v.field for v in rich_status(refused.value).field_violations}
        with pytest.raises(grpc.aio.AioRpcError) as beyond:  # a key's scopes never exceed its owner's
            await ops.CreateApiKey(
                pb.CreateApiKeyRequest(
                    user_id=user.user_id, kind=pb.API_KEY_KIND_HMAC, scopes=["orders:write"]
                ),
                timeout=10,
            )
        assert status_of(beyond.value) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPES_EXCEED_OWNER")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await ops.GetUser(pb.GetUserRequest(user_id="usr_" + "0" * 26), timeout=10)
        assert status_of(missing.value) == (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND")


# --- the policy: deny by default --------------------------------------------------------------------------------


async def call(client: auth_pb2_grpc.AuthServiceAsyncStub, method: str) -> grpc.StatusCode:
    """The status of calling `method` with an empty request (OK, or the code it failed with)."""
    requests = {
        "CreateUser": pb.CreateUserRequest(),
        "RevokeApiKey": pb.RevokeApiKeyRequest(),
        "ListRoles": pb.ListRolesRequest(),
        "Login": pb.LoginRequest(),
        "GetJwks": pb.GetJwksRequest(),
        "VerifySignedRequests": pb.VerifySignedRequestsRequest(),
    }
    try:
        await getattr(client, method)(requests[method], timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("caller", "allowed"),
    [
        ("ops", {"CreateUser", "RevokeApiKey", "ListRoles", "Login", "GetJwks"}),
        ("edge", {"Login", "GetJwks"}),
        ("trading-client", {"Login", "GetJwks"}),
        ("trading", {"GetJwks", "VerifySignedRequests"}),
        ("monitor", {"GetJwks", "VerifySignedRequests", "RevokeApiKey"}),
        ("keyvault", set()),
        ("intruder", set()),  # a certificate of our CA that no rule names
    ],
)
async def test_who_may_call_what(auth: AuthService, caller: str, allowed: set[str]) -> None:
    methods = ("CreateUser", "RevokeApiKey", "ListRoles", "Login", "GetJwks", "VerifySignedRequests")
    async with auth.channel(caller) as channel:
        client = stub(channel)
        for method in methods:
            code = await call(client, method)
            if method in allowed:
                assert code != grpc.StatusCode.PERMISSION_DENIED, (caller, method)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (caller, method)


async def test_verify_batches_are_bounded(auth: AuthService) -> None:
    async with auth.channel("trading") as channel:
        guard = stub(channel)
        item = signed_request("tgk_" + "0" * 38, "tgs_" + "A" * 43, path=GET_ORDER, permission="orders:read")
        reply = await guard.VerifySignedRequests(pb.VerifySignedRequestsRequest(requests=[item]), timeout=10)
        assert not reply.results[0].HasField("principal")  # a bad checksum: refused without a lookup
        with pytest.raises(grpc.aio.AioRpcError) as big:
            await guard.VerifySignedRequests(
                pb.VerifySignedRequestsRequest(requests=[item] * 1025), timeout=10
            )
        assert status_of(big.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_the_source_address_is_the_edges_forwarded_one_only_from_the_edge(auth: AuthService) -> None:
    capture = LogCapture()
    forwarded = (("x-envoy-external-address", "198.51.100.20"),)
    async with auth.channel("ops") as ops_channel:
        await create_user(stub(ops_channel), "omar", roles=("viewer",))
    for caller, expected in (("edge", "198.51.100.20"), ("trading-client", "127.0.0.1")):
        capture.clear()
        async with auth.channel(caller) as channel:
            await stub(channel).Login(
                pb.LoginRequest(username="omar", password=PASSWORD), metadata=forwarded, timeout=10
            )
        logins = [line for line in capture.lines() if line.get("event") == "auth.login"]
        assert [line["source"] for line in logins] == [expected], caller


def test_peer_addresses() -> None:
    assert peer.peer_ip("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer.peer_ip("ipv6:[::1]:5555") == "::1"
    assert peer.peer_ip("ipv6:[fe80::1%25eth0]:5555") == "fe80::1"
    assert peer.peer_ip("ipv6:[::ffff:10.0.0.1]:1") == "::ffff:a00:1"
    for bad in ("unix:/tmp/sock", "ipv4:not-an-ip:1", "", "ipv4:"):
        assert peer.peer_ip(bad) == ""
    assert peer.address_of(" 2001:DB8::1 ") == "2001:db8::1" and peer.address_of("x") == ""
    assert peer.url_encoded_x5t_s256("") is None and peer.url_encoded_x5t_s256("not%20a%20cert") is None


async def test_a_failing_hot_state_ends_the_stream_with_unavailable(auth: AuthService) -> None:
    async with auth.channel("trading") as channel:
        stream = stub(channel).WatchRevocations(pb.WatchRevocationsRequest(), timeout=60)
        await asyncio.wait_for(stream.initial_metadata(), 10)
        await auth.running.assembly.closers[0]()  # the hot state's close: every read fails from now on
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await asyncio.wait_for(stream.read(), 10)
        assert status_of(ended.value) == (grpc.StatusCode.UNAVAILABLE, "HOT_STATE_UNAVAILABLE")
