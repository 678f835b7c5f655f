"""The guard in a real server's chain (the echo service over mutual TLS) with the real auth service: users, tokens
(real logins) and API keys made per test through its RPCs; revocations published by it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from tests.support import AuthServices, start_redis, stop_process, wait_healthy
from tests.tradeguard.guard.conftest import COLLECT, ECHO_METHOD, EXPAND, Guarded, guarded_echo
from tests.tradeguard.guard.tokens import RealKeySigner
from tradeguard import signing
from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.guard.client import ApiKeyCredentials, bearer_interceptors, signing_interceptors
from tradeguard.mesh import pki, tls
from tradeguard.signing import SignedRequest
from tradeguard.testing import LogCapture, eventually

Metadata = tuple[tuple[str, str], ...]


def stub(channel: grpc.aio.Channel) -> echo_pb2_grpc.EchoServiceAsyncStub:
    return echo_pb2_grpc.EchoServiceStub(channel)


async def _texts(requests: list[str]) -> object:
    for text in requests:
        yield echo_pb2.CollectRequest(text=text)


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call  # type: ignore[misc]
    return failed.value.code()


# --- JWT ----------------------------------------------------------------------------------------------------


async def test_a_bearer_token_reaches_the_handler_as_its_principal_in_all_call_kinds(
    guarded: Guarded,
) -> None:
    user, token = await guarded.token(("trader",))
    async with guarded.channel(bearer_interceptors(token)) as channel:
        echo = stub(channel)
        expected = f"{user.user_id}|{user.account_id}|-|orders:read,orders:write|"
        assert (await echo.Echo(echo_pb2.EchoRequest(text="hi"))).text == expected
        assert [r.text async for r in echo.Expand(echo_pb2.ExpandRequest(count=2))] == [expected] * 2
        collected = await echo.Collect(_texts(["a", "b", "c"]))  # type: ignore[arg-type]
        assert collected.text == expected and collected.count == 3


async def test_no_credentials_is_one_opaque_unauthenticated_with_the_cause_in_the_log(
    guarded: Guarded, signer: RealKeySigner
) -> None:
    logs = LogCapture()
    token = await signer.token(exp=int(time.time()) - 60)  # signed with the real key, expired
    async with guarded.echo.channel("ops") as plain, guarded.channel(bearer_interceptors(token)) as expired:
        for channel, cause in ((plain, "no credentials"), (expired, "token expired")):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub(channel).Echo(echo_pb2.EchoRequest(text="x"))
            assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert failed.value.details() == "authentication failed"
            lines = await logs.settled_rpc_lines(1, ECHO_METHOD)
            assert lines[-1]["cause"] == cause
            logs.clear()
    assert token not in logs.text


async def test_a_scope_short_of_the_permission_is_permission_denied(guarded: Guarded) -> None:
    user, token = await guarded.token(("viewer",))  # scope orders:read
    async with guarded.channel(bearer_interceptors(token)) as channel:
        assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.startswith(f"{user.user_id}|")
        denied = stub(channel).Collect(_texts(["a"]))  # type: ignore[arg-type]
        assert await code_of(denied) == grpc.StatusCode.PERMISSION_DENIED


async def test_two_kinds_of_credentials_or_a_repeated_header_are_refused(guarded: Guarded) -> None:
    user, token = await guarded.token(("viewer",))
    _, key = await guarded.key()
    both = [*bearer_interceptors(token), *signing_interceptors(key)]
    async with guarded.channel(both) as channel:
        assert await code_of(stub(channel).Echo(echo_pb2.EchoRequest())) == grpc.StatusCode.UNAUTHENTICATED
    twice: Metadata = (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}"))
    async with guarded.echo.channel("ops") as channel:
        call = stub(channel).Echo(echo_pb2.EchoRequest(), metadata=twice)
        assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED
        once = await stub(channel).Echo(echo_pb2.EchoRequest(), metadata=twice[:1])
        assert once.text.startswith(f"{user.user_id}|")


# --- revocation ----------------------------------------------------------------------------------------------


async def test_a_revocation_reaches_a_running_guard_within_one_second(guarded: Guarded) -> None:
    user, token = await guarded.token(("viewer",))
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    revocations = guarded.guard.revocations
    async with guarded.channel(bearer_interceptors(token)) as channel:
        assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.startswith(
            f"{user.user_id}|"
        )  # cached
        started = time.monotonic()  # from the operator's RevokeTokens call to the running guard
        await guarded.revoke(jti=jti)
        await eventually(lambda: revocations.token_revoked(jti, None, user.user_id, 0) is not None, 5)
        measured = time.monotonic() - started
        assert measured < 1.0, f"the revocation took {measured:.3f} s to reach the guard"
        assert await code_of(stub(channel).Echo(echo_pb2.EchoRequest())) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_key_is_refused_even_if_auth_answered_for_it(guarded: Guarded) -> None:
    _, key = await guarded.key(tier="pro")
    key_id = key.key_id
    async with guarded.channel(signing_interceptors(key)) as channel:
        assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.endswith("|pro")
        await guarded.revoke(key_id=key_id)  # the guard learns it from the stream, whatever auth answers
        await eventually(lambda: guarded.guard.revocations.key_revoked(key_id), 5)
        assert await code_of(stub(channel).Echo(echo_pb2.EchoRequest())) == grpc.StatusCode.UNAUTHENTICATED


async def test_the_stream_resumes_after_the_last_sequence_when_auth_comes_back(
    pki_paths: pki.PkiPaths, auth: AuthServices, tmp_path: Path
) -> None:
    # An auth service of its own on the session's key vault, its hot state in a Redis of this test's own: its
    # revocation log outlives the restart on the same port.
    redis = start_redis(tmp_path / "redis")
    name = f"auth-resume-{secrets.token_hex(4)}"
    extra = {"TRADEGUARD_AUTH_REDIS_URL": f"redis://127.0.0.1:{redis.port}"}
    ops = tls.Workload.of(auth.paths, "ops")
    first, target = auth.start_auth(name, extra)
    log = auth.paths.home / f"{name}.log"
    port = int(target.rsplit(":", 1)[1])
    second = None
    try:
        await eventually(redis.answers, 10)
        await wait_healthy(first, target, "auth", ops, log)
        async with guarded_echo(pki_paths, auth, auth_target=target, max_outage_s=30.0) as guarded:
            revocations = guarded.guard.revocations
            await guarded.revoke(jti="a")
            await guarded.revoke(jti="b")
            # sequences in Redis start at the publisher's clock (µs): the second one is the first one's next
            await eventually(lambda: revocations.token_revoked("b", None, "u", 0) is not None, 5)
            second_sequence = revocations.last_sequence
            assert revocations.token_revoked("a", None, "u", 0) is not None
            user, token = await guarded.token(("viewer",))
            await asyncio.to_thread(stop_process, first)
            await eventually(lambda: not guarded.guard.revocations.is_up, 5)
            async with guarded.channel(
                bearer_interceptors(token)
            ) as channel:  # within the outage bound: served
                assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.startswith(f"{user.user_id}|")
            # the same revocation log (Redis) and records, served again on the same port
            second, _ = auth.start_auth(name, extra, port=port)
            await wait_healthy(second, target, "auth", ops, log)
            await guarded.revoke(jti="c")
            await eventually(lambda: revocations.last_sequence == second_sequence + 1, 10)
            assert guarded.since[0] == 1 and guarded.since[-1] == second_sequence + 1  # resumed after b
            assert guarded.guard.revocations.token_revoked("c", None, "u", 0) is not None
    finally:
        for process in (first, second):
            if process is not None:
                await asyncio.to_thread(stop_process, process)
        redis.stop()


# --- signed API keys ---------------------------------------------------------------------------------------


async def test_hmac_and_ed25519_signed_calls_in_all_call_kinds(guarded: Guarded) -> None:
    first, hmac_credentials = await guarded.key(tier="pro")
    second, ed_credentials = await guarded.key(tier="basic", ed25519_seed=os.urandom(32))
    hmac_key, ed_key = hmac_credentials.key_id, ed_credentials.key_id
    secret = hmac_credentials.secret
    assert secret is not None
    for credentials, who in (
        (hmac_credentials, f"{first.user_id}|{first.account_id}|{hmac_key}|orders:read,orders:write|pro"),
        (ed_credentials, f"{second.user_id}|{second.account_id}|{ed_key}|orders:read,orders:write|basic"),
    ):
        async with guarded.channel(signing_interceptors(credentials)) as channel:
            echo = stub(channel)
            assert (await echo.Echo(echo_pb2.EchoRequest(text="x"))).text == who
            assert [r.text async for r in echo.Expand(echo_pb2.ExpandRequest(count=1))] == [who]
            assert (await echo.Collect(_texts(["a", "b"]))).text == who  # type: ignore[arg-type]
            plain = iter([echo_pb2.CollectRequest(text="a")])  # a plain iterable of requests is signed too
            assert (await echo.Collect(plain)).text == who
    paths = {item.path for item in guarded.sent}
    assert paths == {ECHO_METHOD, EXPAND, COLLECT}
    assert repr(ApiKeyCredentials(hmac_key, secret=secret)).count(secret) == 0


def _signed(key_id: str, secret: str, body: bytes, path: str = ECHO_METHOD) -> Metadata:
    now = time.time_ns() // 1_000_000
    return signing.signed_headers(
        signing.Scheme.HMAC_SHA256, secret, key_id, now, signing.new_nonce(os.urandom), path, body
    )


async def test_the_signature_covers_the_raw_bytes_as_received(guarded: Guarded) -> None:
    user, key = await guarded.key()
    key_id, secret = key.key_id, key.secret
    assert secret is not None
    sent = echo_pb2.EchoRequest(text="buy 1").SerializeToString()
    altered = echo_pb2.EchoRequest(text="buy 9").SerializeToString()
    # the same message twice over: parses to text "a", re-serialises to different bytes
    duplicated = (
        echo_pb2.EchoRequest(text="x").SerializeToString()
        + echo_pb2.EchoRequest(text="a").SerializeToString()
    )
    assert echo_pb2.EchoRequest.FromString(duplicated).SerializeToString() != duplicated
    async with guarded.echo.channel("ops") as channel:
        raw = channel.unary_unary(
            ECHO_METHOD, request_serializer=None, response_deserializer=echo_pb2.EchoResponse.FromString
        )
        ok = await raw(sent, metadata=_signed(key_id, secret, sent))
        assert ok.text.startswith(f"{user.user_id}|")
        assert (
            await code_of(raw(altered, metadata=_signed(key_id, secret, sent)))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert guarded.sent[-1].body_sha256 == hashlib.sha256(altered).hexdigest()
        reply = await raw(duplicated, metadata=_signed(key_id, secret, duplicated))
        assert reply.text.startswith(f"{user.user_id}|")
        wrong_path = _signed(key_id, secret, sent, path=EXPAND)
        assert await code_of(raw(sent, metadata=wrong_path)) == grpc.StatusCode.UNAUTHENTICATED
        replayed = _signed(key_id, secret, sent)
        await raw(sent, metadata=replayed)
        assert await code_of(raw(sent, metadata=replayed)) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_key_whose_scopes_lack_the_permission_is_permission_denied(guarded: Guarded) -> None:
    user, key = await guarded.key(scopes="orders:read")
    async with guarded.channel(signing_interceptors(key)) as channel:
        assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.startswith(f"{user.user_id}|")
        assert await code_of(stub(channel).Collect(_texts(["a"]))) == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[arg-type]


async def test_a_key_id_with_a_bad_checksum_never_reaches_auth(guarded: Guarded) -> None:
    _, key = await guarded.key()
    key_id, secret = key.key_id, key.secret
    assert secret is not None
    forged = key_id[:-1] + ("A" if key_id[-1] != "A" else "B")
    body = echo_pb2.EchoRequest().SerializeToString()
    metadata = tuple((k, forged if k == signing.HEADER_KEY else v) for k, v in _signed(key_id, secret, body))
    before = len(guarded.sent)
    async with guarded.echo.channel("ops") as channel:
        assert (
            await code_of(stub(channel).Echo(echo_pb2.EchoRequest(), metadata=metadata))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    assert len(guarded.sent) == before


async def test_concurrent_signed_calls_share_batch_rpcs(guarded: Guarded) -> None:
    """Calls that arrive while a verification RPC is in flight queue and go together as the next one. The first
    batch of the burst is held (on the way to the real auth) until the rest have queued behind it, so the test
    does not depend on how fast this machine delivers 64 calls."""
    user, key = await guarded.key()
    batcher = guarded.guard.signed.batcher
    verify = batcher._run_batch
    held: list[int] = []

    async def holding_the_first(requests: Sequence[SignedRequest]) -> Any:
        if not held:
            held.append(len(requests))
            await eventually(lambda: len(requests) + batcher.pending == 64, 30)
        return await verify(requests)

    async with guarded.channel(signing_interceptors(key)) as channel:
        echo = stub(channel)
        await echo.Echo(echo_pb2.EchoRequest())  # the key's first use, alone
        calls_before = guarded.guard.auth.verify_calls
        batcher._run_batch = holding_the_first
        replies = await asyncio.gather(*(echo.Echo(echo_pb2.EchoRequest(text=str(i))) for i in range(64)))
    assert all(r.text.startswith(f"{user.user_id}|") for r in replies)
    rpcs = guarded.guard.auth.verify_calls - calls_before
    assert rpcs == 2, f"{rpcs} verification RPCs for 64 concurrent calls"  # the held batch, then all the rest
    assert batcher.largest_batch == max(held[0], 64 - held[0])


# --- the edge's headers ----------------------------------------------------------------------------------------

EDGE: Metadata = (
    ("x-tg-principal", "usr_5"),
    ("x-tg-account", "acct-5"),
    ("x-tg-scopes", "orders:read orders:write"),
    ("x-tg-tier", "gold"),
)


async def test_edge_headers_are_trusted_only_from_the_edge(guarded: Guarded) -> None:
    async with guarded.echo.channel("edge") as edge:
        reply = await stub(edge).Echo(echo_pb2.EchoRequest(), metadata=EDGE)
        assert reply.text == "usr_5|acct-5|-|orders:read,orders:write|gold"
        bare = stub(edge).Echo(echo_pb2.EchoRequest())
        assert await code_of(bare) == grpc.StatusCode.UNAUTHENTICATED
    # a token of a real login from the trading bot's certificate, presented with that certificate
    _, token = await guarded.token(("viewer",), caller="trading-client")
    async with (
        guarded.echo.channel("ops") as ops,
        guarded.channel(bearer_interceptors(token), "trading-client") as monitor,
    ):
        assert (
            await code_of(stub(ops).Echo(echo_pb2.EchoRequest(), metadata=EDGE))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        # a valid token does not make the spoofed headers acceptable: refused, not silently dropped
        spoofed = stub(monitor).Echo(echo_pb2.EchoRequest(), metadata=EDGE[:1])
        assert await code_of(spoofed) == grpc.StatusCode.UNAUTHENTICATED


# --- per method ---------------------------------------------------------------------------------------------


async def test_undeclared_methods_are_denied_and_public_ones_see_no_principal(
    pki_paths: pki.PkiPaths, auth: AuthServices
) -> None:
    async with guarded_echo(
        pki_paths, auth, permissions={ECHO_METHOD: "orders:read"}, public=[EXPAND]
    ) as guarded:
        user, token = await guarded.token(("trader",))
        async with guarded.channel(bearer_interceptors(token)) as channel:
            echo = stub(channel)
            assert (await echo.Echo(echo_pb2.EchoRequest())).text.startswith(f"{user.user_id}|")
            assert await code_of(echo.Collect(_texts(["a"]))) == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[arg-type]
            # after an authenticated call on the same connection, a public method sees nobody
            assert [r.text async for r in echo.Expand(echo_pb2.ExpandRequest(count=1))] == ["nobody"]
        async with guarded.echo.channel("ops") as anonymous:
            assert [r.text async for r in stub(anonymous).Expand(echo_pb2.ExpandRequest(count=1))] == [
                "nobody"
            ]


async def test_concurrent_calls_each_see_their_own_principal(guarded: Guarded) -> None:
    logged_in = [await guarded.token(("viewer",)) for _ in range(8)]
    users = [user.user_id for user, _ in logged_in]
    channels = [guarded.channel(bearer_interceptors(token)) for _, token in logged_in]
    try:
        replies = await asyncio.gather(
            *(stub(channels[i % 8]).Echo(echo_pb2.EchoRequest()) for i in range(64))
        )
        assert [r.text.split("|")[0] for r in replies] == [users[i % 8] for i in range(64)]
    finally:
        for channel in channels:
            await channel.close(None)


def test_configuration_mistakes_are_refused_at_start() -> None:
    from tradeguard.guard.layer import Guard

    def make(**kwargs: object) -> None:
        Guard(trust_domain="t", jwt=None, signed=None, revocations=None, **kwargs)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="not /<guarded service>"):
        make(services=["a.B"], permissions={"/c.D/M": "orders:read"})
    with pytest.raises(ValueError, match="permission"):
        make(services=["a.B"], permissions={"/a.B/M": "Orders Read"})
    with pytest.raises(ValueError, match="both public and guarded"):
        make(services=["a.B"], permissions={"/a.B/M": "orders:read"}, public=["/a.B/M"])
    with pytest.raises(ValueError, match="at least one service"):
        make(services=[], permissions={})
