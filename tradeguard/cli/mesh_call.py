"""One call from the command line to a local Tradeguard service, over the mesh as a workload identity."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from tradeguard.mesh import pki, tls
from tradeguard.mesh.channel import MeshChannel

__all__ = ["call_service"]

T = TypeVar("T")


async def call_service(
    args: argparse.Namespace, service: str, default_port: int, call: Callable[[MeshChannel], Awaitable[T]]
) -> T | None:
    """`call(channel)` against `args.target` (default 127.0.0.1:$TRADEGUARD_<SERVICE>_PORT) as `args.identity`;
    None once a gRPC error has been printed to stderr (status name and details, nothing else)."""
    port = os.environ.get(f"TRADEGUARD_{service.upper()}_PORT", str(default_port))
    target = args.target or f"127.0.0.1:{port}"
    workload = tls.Workload.of(pki.PkiPaths(args.home), args.identity)
    async with MeshChannel(target, service, workload) as channel:
        try:
            return await call(channel)
        except grpc.aio.AioRpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            return None
