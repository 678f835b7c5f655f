"""examples/guarded_service.py runs as documented and refuses what its guard must refuse."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.support import free_port
from tests.tradeguard.guard.fake_auth import AUDIENCE, ISSUER, small_auth
from tradeguard.echo.v1 import echo_pb2, echo_pb2_grpc
from tradeguard.guard.client import (
    ApiKeyCredentials,
    authenticated_channel,
    bearer_interceptors,
    signing_interceptors,
)
from tradeguard.mesh import pki, tls
from tradeguard.testing import eventually

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "guarded_service.py"


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block the service
        return subprocess.Popen([sys.executable, str(EXAMPLE)], env=env, stdout=out, stderr=out)


def _serving(proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, f"the example exited: {log.read_text()}"
    return "desk serving on" in log.read_text()


async def test_the_example_serves_guarded_calls(pki_paths: pki.PkiPaths, tmp_path: Path) -> None:
    pki.issue(pki_paths, "desk")
    pki.issue(pki_paths, "trading-client")
    async with small_auth(pki_paths, callers=frozenset({"desk"})) as auth:
        port = free_port()
        env = dict(
            os.environ,
            TRADEGUARD_HOME=str(pki_paths.home),
            TRADEGUARD_DESK_PORT=str(port),
            TRADEGUARD_DESK_AUTH_TARGET=auth.target,
            TRADEGUARD_DESK_JWT_ISSUER=ISSUER,
            TRADEGUARD_DESK_JWT_AUDIENCE=AUDIENCE,
        )
        log = tmp_path / "desk.log"
        proc = _start(env, log)
        try:
            await eventually(lambda: _serving(proc, log), 30)
            target, client = f"127.0.0.1:{port}", tls.Workload.of(pki_paths, "trading-client")
            key_id, secret = auth.servicer.add_hmac_key(account="acct-7")
            token = auth.servicer.issuer.token(acct="acct-3", scope="orders:read")
            signed = authenticated_channel(
                target, "desk", client, signing_interceptors(ApiKeyCredentials(key_id, secret=secret))
            )
            bearer = authenticated_channel(target, "desk", client, bearer_interceptors(token))
            async with (
                signed,
                bearer,
                grpc.aio.secure_channel(
                    target,
                    tls.channel_credentials(client),
                    options=[("grpc.ssl_target_name_override", "desk")],
                ) as anonymous,
            ):
                reply = await echo_pb2_grpc.EchoServiceStub(signed).Echo(
                    echo_pb2.EchoRequest(text="quote"), timeout=10
                )
                assert reply.text == "acct-7: quote"
                await eventually(
                    lambda: bool(auth.servicer.watch_since), 10
                )  # the guard's stream is connecting
                for _ in range(100):  # accepted once its first answer arrived, moments later
                    try:
                        reply = await echo_pb2_grpc.EchoServiceStub(bearer).Echo(
                            echo_pb2.EchoRequest(text="q"), timeout=10
                        )
                        break
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                        await asyncio.sleep(0.05)
                assert reply.text == "acct-3: q"
                with pytest.raises(grpc.aio.AioRpcError) as denied:  # orders:write needed
                    await echo_pb2_grpc.EchoServiceStub(bearer).Collect(
                        iter([echo_pb2.CollectRequest(text="a")]), timeout=10
                    )
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await echo_pb2_grpc.EchoServiceStub(anonymous).Echo(echo_pb2.EchoRequest(), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            proc.terminate()
            code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0
