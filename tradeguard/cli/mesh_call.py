"""One call from the command line to a local Tradeguard service, over the mesh as a workload identity."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from tradeguard import registry
from tradeguard.cli import common
from tradeguard.mesh.channel import MeshChannel

__all__ = ["call_service", "to_json"]

T = TypeVar("T")


async def call_service(
    args: argparse.Namespace, service: str, call: Callable[[MeshChannel], Awaitable[T]]
) -> T | None:
    """`call(channel)` against `args.target` (default: the service's registered port, or
    $TRADEGUARD_<SERVICE>_PORT) as `args.identity`; None once a gRPC error has been printed to stderr (status
    name and details, nothing else). A missing or unusable certificate is a `CliError` saying what to run."""
    target = args.target or common.target(service)
    workload = common.workload(args.home, args.identity)
    async with MeshChannel(target, service, workload) as channel:
        try:
            return await call(channel)
        except grpc.aio.AioRpcError as error:
            print(f"{error.code().name}: {error.details()}", file=sys.stderr)
            if error.code() == grpc.StatusCode.UNAVAILABLE and not args.target:
                variable = f"{registry.env_prefix(service)}_PORT"
                print(
                    f"is the suite running at {target}? start it with `tradeguard up`; "
                    f"the port comes from {variable} (default {registry.lookup(service).port})",
                    file=sys.stderr,
                )
            return None


def to_json(message: Message) -> str:
    """Every field, defaults included (`sealed: false` is an answer, not an absence)."""
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
