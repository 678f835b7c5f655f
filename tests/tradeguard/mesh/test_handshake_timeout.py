"""A connection that never completes its TLS handshake is closed by the server (grpc's default held it 120 s)."""

from __future__ import annotations

import socket

import pytest

from tradeguard.echo import running_echo
from tradeguard.echo.v1 import echo_pb2
from tradeguard.mesh import pki
from tradeguard.mesh.server import HANDSHAKE_TIMEOUT_S, ServerConfig
from tradeguard.testing import eventually


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # still open, nothing to read
    except ConnectionResetError:
        return True


async def test_silent_connections_are_closed_after_the_handshake_timeout(pki_paths: pki.PkiPaths) -> None:
    async with running_echo(pki_paths, handshake_timeout_s=2.0, tls12_self_probe=False) as echo:
        silent = [socket.create_connection(("127.0.0.1", echo.port)) for _ in range(20)]
        try:
            # well before grpc's default of 120 s; `eventually` fails after 10 s
            await eventually(lambda: all(_closed_by_peer(sock) for sock in silent), within_s=10.0)
        finally:
            for sock in silent:
                sock.close()
        # a real mutual-TLS handshake and call still succeed within the bound
        async with echo.channel("ops") as channel:
            reply = await echo.stub(channel).Echo(echo_pb2.EchoRequest(text="hi"), timeout=10)
        assert reply.text == "hi"


def test_the_bound_is_a_positive_setting_of_the_server(pki_paths: pki.PkiPaths) -> None:
    assert (
        ServerConfig(name="echo", port=0, home=pki_paths.home).handshake_timeout_s
        == HANDSHAKE_TIMEOUT_S
        == 10.0
    )
    with pytest.raises(ValueError, match="handshake_timeout_s"):
        ServerConfig(name="echo", port=0, home=pki_paths.home, handshake_timeout_s=0)
    environ = {"TRADEGUARD_HOME": str(pki_paths.home), "TRADEGUARD_ECHO_HANDSHAKE_TIMEOUT_S": "3.5"}
    assert ServerConfig.from_env("echo", 0, environ).handshake_timeout_s == 3.5
    with pytest.raises(ValueError, match="TRADEGUARD_ECHO_HANDSHAKE_TIMEOUT_S"):
        ServerConfig.from_env("echo", 0, {**environ, "TRADEGUARD_ECHO_HANDSHAKE_TIMEOUT_S": "0"})
