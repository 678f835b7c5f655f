"""`tradeguard quota …`: ask the rate-limit service what a subject may do, reset a subject, show the limits in
force; over the mesh as `ops` (the service's policy: `check` as ops or a guarded service, `get` and `limits` as
ops or the monitor, `reset` as ops only) unless --as says otherwise.

A subject is `key:<api key id>` (signed API-key calls) or `user:<user id>` (bearer tokens). An operation is a
full gRPC method (`/tradeguard.trading.v1.TradingService/PlaceOrder`); any other name takes the limits file's
`default` operation.

- `check` decides as a guard would and CONSUMES the cost when allowed (to test a limit by hand);
- `get` reports what `check` would say, consuming nothing;
- `reset` forgets everything the subject has consumed (every limit of every tier it could hit now);
- `limits` shows the limits file in force: its path, SHA-256, when it was loaded, its tiers, and the error of the
  last reload when an edit was refused (the last good file stays in force).

Each prints a short text answer, or with `--json` every field of the service's answer (for scripts). A refused
call is one line on stderr (code, message, the fields at fault) and exit status 1; a decision, allowed or not, is
an answer (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from tradeguard.cli import common
from tradeguard.cli.mesh_call import call_service, printable, to_json
from tradeguard.ratelimit.v1 import ratelimit_pb2 as pb
from tradeguard.ratelimit.v1 import ratelimit_pb2_grpc

__all__ = ["describe_decision", "describe_limits", "register"]

T = TypeVar("T")
if TYPE_CHECKING:  # the typed stub exists only in the generated .pyi
    Stub = ratelimit_pb2_grpc.RateLimitServiceAsyncStub

SERVICE: Final = "ratelimit"
TIMEOUT_S: Final = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = common.service_command(
        subparsers,
        "quota",
        "rate limits: check or read a subject's quota, reset it, show the limits in force",
        __doc__,
        service=SERVICE,
        run=lambda args: asyncio.run(args.handler(args)),
    )

    def action(
        name: str, help_text: str, handler: Callable[[argparse.Namespace], Awaitable[int]]
    ) -> argparse.ArgumentParser:
        parser = command(name, help_text)
        parser.add_argument(
            "--json",
            action="store_true",
            help="print every field of the service's answer as JSON (for scripts)",
        )
        parser.set_defaults(handler=handler)
        return parser

    for name, help_text, handler in (
        ("check", "decide a request as a guard would, consuming its cost when allowed", _check),
        ("get", "what `check` would say now, consuming nothing", _get),
    ):
        parser = action(name, help_text, handler)
        parser.add_argument("subject", help="key:<api key id> or user:<user id>")
        parser.add_argument(
            "--operation",
            default="default",
            help="a full gRPC method (/pkg.Service/Method); other names take the limits file's default operation",
        )
        parser.add_argument(
            "--tier", default="", help="the subject's tier (empty or unknown: the limits file's default tier)"
        )
        parser.add_argument(
            "--cost", type=_cost, default=1, help="units, multiplied by the operation's weights"
        )
    reset = action("reset", "forget everything a subject has consumed", _reset)
    reset.add_argument("subject", help="key:<api key id> or user:<user id>")
    action("limits", "the limits file in force (and the last reload's error, if any)", _limits)


def _cost(value: str) -> int:
    try:
        cost = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if not 1 <= cost <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be from 1 to {2**32 - 1}, got {cost}")
    return cost


# --- calling the service -------------------------------------------------------------------------------------


async def _call(args: argparse.Namespace, call: Callable[[Stub], Awaitable[T]]) -> T | None:
    return await call_service(
        args, SERVICE, lambda channel: call(ratelimit_pb2_grpc.RateLimitServiceStub(channel))
    )


def _print(args: argparse.Namespace, reply: Message | None, text: Callable[[], str]) -> int:
    if reply is None:
        return 1
    print(to_json(reply) if args.json else text())
    return 0


def _quota_check(args: argparse.Namespace) -> pb.QuotaCheck:
    return pb.QuotaCheck(subject=args.subject, tier=args.tier, operation=args.operation, cost=args.cost)


async def _check(args: argparse.Namespace) -> int:
    request = pb.CheckQuotaRequest(check=_quota_check(args))
    reply = await _call(args, lambda stub: stub.CheckQuota(request, timeout=TIMEOUT_S))
    return _print(args, reply, lambda: describe_decision(reply.decision if reply else pb.QuotaDecision()))


async def _get(args: argparse.Namespace) -> int:
    request = pb.GetQuotaRequest(check=_quota_check(args))
    reply = await _call(args, lambda stub: stub.GetQuota(request, timeout=TIMEOUT_S))
    return _print(
        args,
        reply,
        lambda: describe_decision(reply.decision if reply else pb.QuotaDecision(), peek=True),
    )


async def _reset(args: argparse.Namespace) -> int:
    request = pb.ResetSubjectRequest(subject=args.subject)
    reply = await _call(args, lambda stub: stub.ResetSubject(request, timeout=TIMEOUT_S))
    cleared = reply.counters_cleared if reply else 0
    return _print(
        args, reply, lambda: f"reset {args.subject}: {cleared} counter{'' if cleared == 1 else 's'} cleared"
    )


async def _limits(args: argparse.Namespace) -> int:
    reply = await _call(args, lambda stub: stub.GetLimits(pb.GetLimitsRequest(), timeout=TIMEOUT_S))
    return _print(args, reply, lambda: describe_limits(reply if reply else pb.GetLimitsResponse()))


# --- what is printed -----------------------------------------------------------------------------------------


def _seconds(value: duration_pb2.Duration) -> float:
    return float(value.seconds + value.nanos / 1e9)


def _when(value: timestamp_pb2.Timestamp) -> datetime:
    return datetime.fromtimestamp(value.seconds + value.nanos / 1e9, UTC)


def _window(value: duration_pb2.Duration) -> str:
    seconds = _seconds(value)
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _in(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{math.ceil(seconds)} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_decision(decision: pb.QuotaDecision, *, peek: bool = False, now: datetime | None = None) -> str:
    """`allowed`/`refused` with the tier, the retry delay, and one line per limit: remaining of the limit, when
    units next return, and which refused (`peek`: worded as what a check would get)."""
    now = now or datetime.now(UTC)
    verdict = (
        ("would be allowed" if peek else "allowed")
        if decision.allowed
        else ("would be refused" if peek else "refused")
    )
    head = f"{verdict} (tier {printable(decision.tier) or '?'})"
    if not decision.allowed:
        if decision.HasField("retry_after"):
            head += f": retry after {_in(_seconds(decision.retry_after))}"
        elif not decision.store_unavailable:
            head += ": never (the cost exceeds a limit)"
    lines = [head]
    if decision.store_unavailable:
        lines.append(
            "  the counter store did not answer in time: decided by each limit's fail mode (remaining unknown)"
        )
    width = max((len(f"{s.group}/{s.name}") for s in decision.limits), default=0)
    for status in decision.limits:
        name = printable(f"{status.group}/{status.name}")
        line = f"  {name:<{width}}  {status.remaining} of {status.limit} left per {_window(status.window)}"
        if status.HasField("reset_time"):
            wait = max(0.0, (_when(status.reset_time) - now).total_seconds())
            line += f", units return in {_in(wait)}"
        marks = []
        if status.exceeded:
            marks.append("EXCEEDED")
        if status.shadow:
            marks.append("shadow: never refuses")
        if marks:
            line += f"  [{'; '.join(marks)}]"
        lines.append(line)
    if not decision.limits:
        lines.append("  no limit applies (the operation's groups are unlimited in this tier)")
    return "\n".join(lines)


def describe_limits(reply: pb.GetLimitsResponse) -> str:
    loaded = _when(reply.loaded_time)
    lines = [
        f"limits file  {printable(reply.source)}",
        f"sha256       {printable(reply.sha256)}",
        f"loaded       {loaded:%Y-%m-%d %H:%M:%S}Z",
        f"tiers        {', '.join(printable(t) for t in reply.tiers)}",
    ]
    if reply.last_error:
        lines.append(f"last reload  REFUSED, the limits above stay in force: {printable(reply.last_error)}")
    return "\n".join(lines)
