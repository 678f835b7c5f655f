"""`tradeguard alerts …`: the monitor's alerts (tradeguard.monitor.v1.MonitorService), as `ops` by default.

- `list [--detector D] [--state open|acknowledged] [--severity S] [--subject S] [--since AGE] [--limit N]
  [--page-token T]`: newest first, printed as JSON (`next_page_token` for the next page).
- `watch [--since AGE] [--severity S]`: one JSON line per alert as it is raised (with `--since`, the ones raised
  in that period first), until interrupted; a dropped stream is resumed where it stopped, none printed twice.
- `ack ALERT_ID [--note TEXT]`: acknowledge an alert (the acknowledgement names your workload).
- `status`: the monitor's position in the audit log, its lag, the detectors' counts, the configuration in force.

AGE is `<n>s|m|h|d` (`30m`, `24h`). Severities: info, warning, critical (at least that one).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from typing import Any, Final

import grpc
from google.protobuf import json_format, timestamp_pb2

from tradeguard.cli import common
from tradeguard.cli.mesh_call import call_service, describe, to_json
from tradeguard.mesh.channel import MeshChannel
from tradeguard.monitor.v1 import monitor_pb2 as pb
from tradeguard.monitor.v1 import monitor_pb2_grpc
from tradeguard.rpc.status import rich_status

__all__ = ["parse_age", "register"]

SEVERITIES: Final = {
    "info": pb.SEVERITY_INFO,
    "warning": pb.SEVERITY_WARNING,
    "critical": pb.SEVERITY_CRITICAL,
}
STATES: Final = {"open": pb.ALERT_STATE_OPEN, "acknowledged": pb.ALERT_STATE_ACKNOWLEDGED}
_AGE: Final = re.compile(r"([0-9]{1,9})([smhd])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_REMEMBERED: Final = 10_000
_RESUME: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def parse_age(text: str) -> int:
    """Seconds in `<n>s|m|h|d`; ValueError otherwise."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an age such as 30m, 24h or 7d")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


def _since(age: str | None) -> timestamp_pb2.Timestamp | None:
    if age is None:
        return None
    try:
        seconds = parse_age(age)
    except ValueError as error:
        raise common.CliError(str(error)) from None
    start = time.time_ns() // 1000 - seconds * 1_000_000
    return timestamp_pb2.Timestamp(seconds=start // 1_000_000, nanos=start % 1_000_000 * 1000)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    action = common.service_command(
        subparsers,
        "alerts",
        "list, watch and acknowledge the monitor's alerts",
        __doc__,
        service="monitor",
        run=lambda args: asyncio.run(_run(args)),
    )
    listing = action("list", "alerts, newest first (JSON)")
    listing.add_argument("--detector", default="", help="e.g. rate_spike, impossible_travel, auth_failures")
    listing.add_argument("--state", choices=list(STATES), help="open or acknowledged (default: both)")
    listing.add_argument("--severity", choices=list(SEVERITIES), help="at least this severity")
    listing.add_argument("--subject", default="", help="a key id, account, address or user")
    listing.add_argument("--since", metavar="AGE", help="raised in the last AGE (30m, 24h, 7d)")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    listing.add_argument("--page-token", default="", help="next_page_token of a previous list")
    watch = action("watch", "print each alert as it is raised (one JSON line each) until interrupted")
    watch.add_argument("--since", metavar="AGE", help="first the alerts raised in the last AGE")
    watch.add_argument("--severity", choices=list(SEVERITIES), help="at least this severity")
    ack = action("ack", "acknowledge an alert")
    ack.add_argument("alert_id", help="as `alerts list` shows it")
    ack.add_argument("--note", default="", help="what was done (at most 1,000 characters)")
    action("status", "the monitor's position, lag, detectors and configuration (JSON)")


async def _run(args: argparse.Namespace) -> int:
    if args.action == "watch":
        return await _watch(args)
    reply = await call_service(
        args, "monitor", lambda channel: _call(monitor_pb2_grpc.MonitorServiceStub(channel), args)
    )
    if reply is None:
        return 1
    print(to_json(reply))
    return 0


async def _call(stub: monitor_pb2_grpc.MonitorServiceAsyncStub, args: argparse.Namespace) -> Any:
    if args.action == "list":
        if not 1 <= args.limit <= 1000:
            raise common.CliError("--limit must be between 1 and 1000")
        request = pb.ListAlertsRequest(
            detector=args.detector,
            state=STATES[args.state] if args.state else pb.ALERT_STATE_UNSPECIFIED,
            min_severity=SEVERITIES[args.severity] if args.severity else pb.SEVERITY_UNSPECIFIED,
            subject=args.subject,
            page_size=args.limit,
            page_token=args.page_token,
        )
        since = _since(args.since)
        if since is not None:
            request.since.CopyFrom(since)
        return await stub.ListAlerts(request, timeout=30)
    if args.action == "ack":
        return await stub.AcknowledgeAlert(
            pb.AcknowledgeAlertRequest(alert_id=args.alert_id, note=args.note), timeout=30
        )
    return await stub.GetStatus(pb.GetStatusRequest(), timeout=30)


def _line(alert: pb.Alert) -> str:
    return json_format.MessageToJson(alert, preserving_proto_field_name=True, indent=None)


async def _watch(args: argparse.Namespace) -> int:
    target = args.target or common.target("monitor")
    workload = common.workload(args.home, args.identity)
    since = _since(args.since)
    minimum = SEVERITIES[args.severity] if args.severity else pb.SEVERITY_UNSPECIFIED
    # the ids printed lately (bounded: a resumed stream repeats only recent ones)
    printed: dict[str, None] = {}
    backoff = 0.1
    async with MeshChannel(target, "monitor", workload, default_timeout_s=None) as channel:
        stub = monitor_pb2_grpc.MonitorServiceStub(channel)
        while True:
            request = pb.WatchAlertsRequest(min_severity=minimum)
            if since is not None:
                request.since.CopyFrom(since)
            try:
                async for reply in stub.WatchAlerts(request):
                    backoff = 0.1
                    alert = reply.alert
                    if alert.alert_id in printed:
                        continue
                    printed[alert.alert_id] = None
                    if len(printed) > _REMEMBERED:
                        del printed[next(iter(printed))]
                    since = alert.raised_time  # a resumed stream starts here (what it repeats is skipped)
                    print(_line(alert), flush=True)
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RESUME:
                    print(describe(rich_status(error)), file=sys.stderr)
                    return 1
                print(f"alerts watch: {error.code().name}, resuming", file=sys.stderr, flush=True)
            await asyncio.sleep(backoff)
            backoff = min(5.0, backoff * 2)
