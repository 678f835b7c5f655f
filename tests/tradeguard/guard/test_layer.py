"""The guard in a real server's chain (the echo service over mutual TLS) with a small in-test auth service."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import grpc
import jwt
import pytest

from tests.tradeguard.guard.conftest import COLLECT, ECHO_METHOD, EXPAND, Guarded, guarded_echo
from tests.tradeguard.guard.fake_auth import RunningAuth, small_auth
from tradeguard import signing
from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.guard.client import ApiKeyCredentials, bearer_interceptors, signing_interceptors
from tradeguard.mesh import pki
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
    token = guarded.auth.servicer.issuer.token(sub="usr_7", acct="acct-7", scope="orders:read orders:write")
    async with guarded.channel(bearer_interceptors(token)) as channel:
        echo = stub(channel)
        expected = "usr_7|acct-7|-|orders:read,orders:write|"
        assert (await echo.Echo(echo_pb2.EchoRequest(text="hi"))).text == expected
        assert [r.text async for r in echo.Expand(echo_pb2.ExpandRequest(count=2))] == [expected] * 2
        collected = await echo.Collect(_texts(["a", "b", "c"]))  # type: ignore[arg-type]
        assert collected.text == expected and collected.count == 3


async def test_no_credentials_is_one_opaque_unauthenticated_with_the_cause_in_the_log(
    guarded: Guarded,
) -> None:
    logs = LogCapture()
    token = guarded.auth.servicer.issuer.token(exp=int(time.time()) - 60)
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
    token = guarded.auth.servicer.issuer.token(scope="orders:read")
    async with guarded.channel(bearer_interceptors(token)) as channel:
        assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.startswith("usr_1|")
        denied = stub(channel).Collect(_texts(["a"]))  # type: ignore[arg-type]
        assert await code_of(denied) == grpc.StatusCode.PERMISSION_DENIED


async def test_two_kinds_of_credentials_or_a_repeated_header_are_refused(guarded: Guarded) -> None:
    token = guarded.auth.servicer.issuer.token()
    key_id, secret = guarded.auth.servicer.add_hmac_key()
    both = [*bearer_interceptors(token), *signing_interceptors(ApiKeyCredentials(key_id, secret=secret))]
    async with guarded.channel(both) as channel:
        assert await code_of(stub(channel).Echo(echo_pb2.EchoRequest())) == grpc.StatusCode.UNAUTHENTICATED
    twice: Metadata = (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}"))
    async with guarded.echo.channel("ops") as channel:
        call = stub(channel).Echo(echo_pb2.EchoRequest(), metadata=twice)
        assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED
        once = await stub(channel).Echo(echo_pb2.EchoRequest(), metadata=twice[:1])
        assert once.text.startswith("usr_1|")


# --- revocation ----------------------------------------------------------------------------------------------


async def test_a_revocation_reaches_a_running_guard_within_one_second(guarded: Guarded) -> None:
    issuer = guarded.auth.servicer.issuer
    token = issuer.token()
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    revocations = guarded.guard.revocations
    async with guarded.channel(bearer_interceptors(token)) as channel:
        assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.startswith("usr_1|")  # now cached
        started = time.monotonic()
        guarded.auth.servicer.revoke(jti=jti)
        await eventually(lambda: revocations.token_revoked(jti, None, "usr_1", 0) is not None, 5)
        measured = time.monotonic() - started
        assert measured < 1.0, f"the revocation took {measured:.3f} s to reach the guard"
        assert await code_of(stub(channel).Echo(echo_pb2.EchoRequest())) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_revoked_key_is_refused_even_if_auth_answered_for_it(guarded: Guarded) -> None:
    key_id, secret = guarded.auth.servicer.add_hmac_key()
    async with guarded.channel(signing_interceptors(ApiKeyCredentials(key_id, secret=secret))) as channel:
        assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.endswith("|pro")
        guarded.auth.servicer.revoke(
            key_id=key_id
        )  # this small auth still verifies the key: the guard must not
        await eventually(lambda: guarded.guard.revocations.key_revoked(key_id), 5)
        assert await code_of(stub(channel).Echo(echo_pb2.EchoRequest())) == grpc.StatusCode.UNAUTHENTICATED


async def test_the_stream_resumes_after_the_last_sequence_when_auth_comes_back(
    pki_paths: pki.PkiPaths,
) -> None:
    async with small_auth(pki_paths) as first:
        port = first.server.port
        first.servicer.revoke(jti="a")
        first.servicer.revoke(jti="b")
        async with guarded_echo(pki_paths, first, max_outage_s=30.0) as guarded:
            await eventually(lambda: guarded.guard.revocations.last_sequence == 2, 5)
            token = first.servicer.issuer.token()
            await first.server.stop(grace=0, drain=0)
            await eventually(lambda: not guarded.guard.revocations.is_up, 5)
            async with guarded.channel(
                bearer_interceptors(token)
            ) as channel:  # within the outage bound: served
                assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.startswith("usr_1|")
            second = first.servicer  # the same revocation log, served again on the same port
            second.revoke(jti="c")
            async with small_auth(pki_paths, second, port=port):
                await eventually(lambda: guarded.guard.revocations.last_sequence == 3, 10)
            assert second.watch_since[0] == 1 and second.watch_since[-1] == 3  # resumed after 2
            assert guarded.guard.revocations.token_revoked("c", None, "u", 0) is not None


# --- signed API keys ---------------------------------------------------------------------------------------


async def test_hmac_and_ed25519_signed_calls_in_all_call_kinds(guarded: Guarded) -> None:
    hmac_key, secret = guarded.auth.servicer.add_hmac_key()
    ed_key, seed = guarded.auth.servicer.add_ed25519_key()
    for credentials, who in (
        (ApiKeyCredentials(hmac_key, secret=secret), f"usr_1|acct-1|{hmac_key}|orders:read,orders:write|pro"),
        (
            ApiKeyCredentials(ed_key, ed25519_seed=seed),
            f"usr_2|acct-2|{ed_key}|orders:read,orders:write|basic",
        ),
    ):
        async with guarded.channel(signing_interceptors(credentials)) as channel:
            echo = stub(channel)
            assert (await echo.Echo(echo_pb2.EchoRequest(text="x"))).text == who
            assert [r.text async for r in echo.Expand(echo_pb2.ExpandRequest(count=1))] == [who]
            assert (await echo.Collect(_texts(["a", "b"]))).text == who  # type: ignore[arg-type]
            plain = iter([echo_pb2.CollectRequest(text="a")])  # a plain iterable of requests is signed too
            assert (await echo.Collect(plain)).text == who
    paths = {item.path for item in guarded.auth.servicer.verified}
    assert paths == {ECHO_METHOD, EXPAND, COLLECT}
    assert repr(ApiKeyCredentials(hmac_key, secret=secret)).count(secret) == 0


def _signed(key_id: str, secret: str, body: bytes, path: str = ECHO_METHOD) -> Metadata:
    now = time.time_ns() // 1_000_000
    return signing.signed_headers(
        signing.Scheme.HMAC_SHA256, secret, key_id, now, signing.new_nonce(os.urandom), path, body
    )


async def test_the_signature_covers_the_raw_bytes_as_received(guarded: Guarded) -> None:
    key_id, secret = guarded.auth.servicer.add_hmac_key()
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
        assert ok.text.startswith("usr_1|")
        assert (
            await code_of(raw(altered, metadata=_signed(key_id, secret, sent)))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert guarded.auth.servicer.verified[-1].body_sha256 == hashlib.sha256(altered).hexdigest()
        assert (await raw(duplicated, metadata=_signed(key_id, secret, duplicated))).text.startswith("usr_1|")
        wrong_path = _signed(key_id, secret, sent, path=EXPAND)
        assert await code_of(raw(sent, metadata=wrong_path)) == grpc.StatusCode.UNAUTHENTICATED
        replayed = _signed(key_id, secret, sent)
        await raw(sent, metadata=replayed)
        assert await code_of(raw(sent, metadata=replayed)) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_key_whose_scopes_lack_the_permission_is_permission_denied(guarded: Guarded) -> None:
    key_id, secret = guarded.auth.servicer.add_hmac_key(scopes="orders:read")
    async with guarded.channel(signing_interceptors(ApiKeyCredentials(key_id, secret=secret))) as channel:
        assert (await stub(channel).Echo(echo_pb2.EchoRequest())).text.startswith("usr_1|")
        assert await code_of(stub(channel).Collect(_texts(["a"]))) == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[arg-type]


async def test_a_key_id_with_a_bad_checksum_never_reaches_auth(guarded: Guarded) -> None:
    key_id, secret = guarded.auth.servicer.add_hmac_key()
    forged = key_id[:-1] + ("A" if key_id[-1] != "A" else "B")
    body = echo_pb2.EchoRequest().SerializeToString()
    metadata = tuple((k, forged if k == signing.HEADER_KEY else v) for k, v in _signed(key_id, secret, body))
    before = len(guarded.auth.servicer.verified)
    async with guarded.echo.channel("ops") as channel:
        assert (
            await code_of(stub(channel).Echo(echo_pb2.EchoRequest(), metadata=metadata))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    assert len(guarded.auth.servicer.verified) == before


async def test_concurrent_signed_calls_share_batch_rpcs(guarded: Guarded) -> None:
    guarded.auth.servicer.verify_latency_s = 0.02  # the auth service takes its time: calls queue meanwhile
    key_id, secret = guarded.auth.servicer.add_hmac_key()
    async with guarded.channel(signing_interceptors(ApiKeyCredentials(key_id, secret=secret))) as channel:
        echo = stub(channel)
        await echo.Echo(echo_pb2.EchoRequest())
        calls_before = guarded.auth.servicer.verify_calls
        replies = await asyncio.gather(*(echo.Echo(echo_pb2.EchoRequest(text=str(i))) for i in range(64)))
    assert all(r.text.startswith("usr_1|") for r in replies)
    rpcs = guarded.auth.servicer.verify_calls - calls_before
    batcher = guarded.guard.signed.batcher
    assert rpcs < 64 / 4, f"{rpcs} verification RPCs for 64 concurrent calls"
    assert batcher.largest_batch > 4


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
    token = guarded.auth.servicer.issuer.token()
    async with (
        guarded.echo.channel("ops") as ops,
        guarded.channel(bearer_interceptors(token), "monitor") as monitor,
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
    pki_paths: pki.PkiPaths, auth: RunningAuth
) -> None:
    token = auth.servicer.issuer.token()
    async with guarded_echo(
        pki_paths, auth, permissions={ECHO_METHOD: "orders:read"}, public=[EXPAND]
    ) as guarded:
        async with guarded.channel(bearer_interceptors(token)) as channel:
            echo = stub(channel)
            assert (await echo.Echo(echo_pb2.EchoRequest())).text.startswith("usr_1|")
            assert await code_of(echo.Collect(_texts(["a"]))) == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[arg-type]
            # after an authenticated call on the same connection, a public method sees nobody
            assert [r.text async for r in echo.Expand(echo_pb2.ExpandRequest(count=1))] == ["nobody"]
        async with guarded.echo.channel("ops") as anonymous:
            assert [r.text async for r in stub(anonymous).Expand(echo_pb2.ExpandRequest(count=1))] == [
                "nobody"
            ]


async def test_concurrent_calls_each_see_their_own_principal(guarded: Guarded) -> None:
    issuer = guarded.auth.servicer.issuer
    channels = [
        guarded.channel(bearer_interceptors(issuer.token(sub=f"usr_{i}", acct=f"acct-{i}"))) for i in range(8)
    ]
    try:
        replies = await asyncio.gather(
            *(stub(channels[i % 8]).Echo(echo_pb2.EchoRequest()) for i in range(64))
        )
        assert [r.text.split("|")[0] for r in replies] == [f"usr_{i % 8}" for i in range(64)]
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
