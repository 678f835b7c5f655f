"""One call from the command line to a local Tradeguard service, over the mesh as a workload identity.

A failed call is printed as one line on stderr from the service's rich status (tradeguard.rpc.status): the code,
the message, the ErrorInfo reason when it says more than the code, and each bad field of an INVALID_ARGUMENT
(`INVALID_ARGUMENT: … (reason USERNAME_TAKEN; username: already taken)`). What the server sent is untrusted:
control characters are replaced before it reaches the terminal.
"""

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
from tradeguard.guard.client import authenticated_channel
from tradeguard.mesh.channel import MeshChannel
from tradeguard.rpc.status import RichStatus, rich_status

__all__ = ["Authentication", "Hint", "call_service", "describe", "printable", "to_json"]

T = TypeVar("T")

# Interceptors that authenticate every call (tradeguard.guard.client), made once the workload is known to be usable.
Authentication = Callable[[], Awaitable[list[grpc.aio.ClientInterceptor]]]
# More to say about a failed call (what to run), on the same line; None for nothing.
Hint = Callable[[RichStatus], str | None]

_MAX_SHOWN = 500  # characters of a server's message shown


def printable(text: str) -> str:
    """`text` on one line with no control characters (a server's message may carry terminal escapes)."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return cleaned if len(cleaned) <= _MAX_SHOWN else cleaned[: _MAX_SHOWN - 1] + "…"


def describe(status: RichStatus) -> str:
    """One line: `CODE: message (reason R; field: description; …)`."""
    extra = []
    if status.reason and status.reason != status.code.name:
        extra.append(f"reason {printable(status.reason)}")
    extra += [f"{printable(v.field)}: {printable(v.description)}" for v in status.field_violations]
    if status.retry_after_s is not None:
        extra.append(f"retry after {status.retry_after_s} s")
    line = f"{status.code.name}: {printable(status.message)}"
    return f"{line} ({'; '.join(extra)})" if extra else line


async def call_service(
    args: argparse.Namespace,
    service: str,
    call: Callable[[grpc.aio.Channel], Awaitable[T]],
    *,
    authentication: Authentication | None = None,
    hint: Hint | None = None,
) -> T | None:
    """`call(channel)` against `args.target` (default: the service's registered port, or
    $TRADEGUARD_<SERVICE>_PORT) as `args.identity`, each call authenticated by `authentication()` when given;
    None once a gRPC error has been printed to stderr (`describe`, then `hint`'s words). A missing or unusable
    certificate is a `CliError` saying what to run."""
    target = args.target or common.target(service)
    workload = common.workload(args.home, args.identity)
    channel: grpc.aio.Channel
    if authentication is None:
        channel = MeshChannel(target, service, workload)
    else:
        channel = authenticated_channel(target, service, workload, await authentication())
    async with channel:
        try:
            return await call(channel)
        except grpc.aio.AioRpcError as error:
            status = rich_status(error)
            more = hint(status) if hint is not None else None
            print(describe(status) + (f": {more}" if more else ""), file=sys.stderr)
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
