"""``tradeguard pki``: initialise the internal CA, issue workload certificates, show their status."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta

from tradeguard.cli import common
from tradeguard.mesh import pki


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pki init|issue|renew|rotate-intermediate|status``; each sets ``func``.

    ``args.home`` comes from the main parser."""
    parser = subparsers.add_parser(
        "pki",
        help="the internal CA and workload certificates",
        description="The suite's internal CA ($TRADEGUARD_HOME/pki): a root, an intermediate that signs "
        "short-lived workload certificates (SPIFFE ID spiffe://<trust-domain>/svc/NAME), and their status.",
        formatter_class=common.HelpFormatter,
    )
    common.add_home_option(parser)
    commands = parser.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=common.HelpFormatter
        )
        common.add_home_option(sub)
        return sub

    init = command("init", "create the root and intermediate CAs (no-op if they exist)")
    init.add_argument(
        "--trust-domain",
        default=None,
        help="SPIFFE trust domain (default: the existing one, else tradeguard.local)",
    )
    init.add_argument(
        "--no-name-constraints",
        dest="name_constraints",
        action="store_false",
        help="leave the intermediate's URI name constraint out",
    )
    init.set_defaults(func=cmd_init)

    issue = command("issue", "issue (or re-issue) a workload certificate")
    issue.add_argument("name", metavar="NAME", help="workload name, e.g. auth")
    issue.add_argument("--hours", type=float, default=24.0, help="lifetime in hours")
    issue.set_defaults(func=cmd_issue)

    renew = command(
        "renew",
        "re-issue the named certificates that are past half their lifetime, missing or mismatched "
        "(for workloads outside `tradeguard up`, e.g. the Envoy edge: run it from a timer); `edge` is also "
        "published to $TRADEGUARD_HOME/edge, the only PKI files the edge's Envoy sees",
    )
    renew.add_argument("names", metavar="NAME", nargs="+", help="workload names, e.g. edge")
    renew.add_argument("--hours", type=float, default=24.0, help="lifetime of a new certificate, in hours")
    renew.set_defaults(func=cmd_renew)

    rotate = command(
        "rotate-intermediate",
        "replace the intermediate CA (signed by the root); workload certificates are then due for renewal",
    )
    rotate.add_argument("--days", type=float, default=365.0, help="lifetime in days")
    rotate.set_defaults(func=cmd_rotate_intermediate)

    status = command(
        "status",
        "list the CA and workload certificates, their expiry and whether they are due for renewal (and why)",
    )
    status.set_defaults(func=cmd_status)


def _paths(args: argparse.Namespace) -> pki.PkiPaths:
    return pki.PkiPaths(args.home)


def _fail(message: str) -> int:
    print(f"tradeguard pki: error: {message}", file=sys.stderr)
    return 2


def cmd_init(args: argparse.Namespace) -> int:
    paths = _paths(args)
    try:
        td = args.trust_domain
        if td is None:
            td = pki.trust_domain(paths) if paths.trust_domain_file.exists() else "tradeguard.local"
        created = pki.init_ca(paths, td, name_constraints=getattr(args, "name_constraints", True))
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    if created:
        print(f"created CA for trust domain {td} in {paths.dir}")
    else:
        print(f"CA for trust domain {td} already exists in {paths.dir}")
    print(f"trust anchor: {paths.ca_bundle}")
    return 0


def _lifetime(args: argparse.Namespace) -> timedelta:
    hours = float(args.hours)
    if not hours > 0:
        raise ValueError(f"--hours must be positive, not {args.hours}")
    return timedelta(hours=hours)


def cmd_issue(args: argparse.Namespace) -> int:
    paths = _paths(args)
    try:
        info = pki.issue(paths, args.name, lifetime=_lifetime(args))
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"issued {info.spiffe_id}")
    print(f"  certificate: {info.path}")
    print(f"  key:         {paths.key(args.name)}")
    print(f"  not after:   {info.not_after:%Y-%m-%d %H:%M:%S}Z")
    return _publish_edge(paths, [args.name])


def _publish_edge(paths: pki.PkiPaths, names: list[str]) -> int:
    """The edge's certificate, key and ca.crt, published as one unit where Envoy reads them (and nothing else
    of the PKI): after every issue or renewal of `edge`."""
    if pki.EDGE not in names:
        return 0
    try:
        published = pki.publish_bundle(paths, pki.EDGE, paths.edge_dir)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"edge bundle {'published' if published else 'up to date'} in {paths.edge_dir}/current")
    return 0


def cmd_renew(args: argparse.Namespace) -> int:
    paths = _paths(args)
    try:
        renewed = set(pki.renew_due(paths, args.names, lifetime=_lifetime(args)))
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    for name in args.names:
        print(f"{name}: {'renewed' if name in renewed else 'still fresh'}")
    return _publish_edge(paths, args.names)


def cmd_rotate_intermediate(args: argparse.Namespace) -> int:
    paths = _paths(args)
    try:
        days = float(args.days)
        if not days > 0:
            raise ValueError(f"--days must be positive, not {args.days}")
        expiry = pki.rotate_intermediate(paths, lifetime=timedelta(days=days))
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    print(f"new intermediate CA valid until {expiry:%Y-%m-%d %H:%M:%S}Z")
    print(
        "workload certificates are now due: `tradeguard up` renews its own; others: tradeguard pki renew NAME…"
    )
    return 0


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{sign}{days}d{hours:02d}h"
    return f"{sign}{hours}h{minutes:02d}m"


def _state(paths: pki.PkiPaths, info: pki.CertInfo, now: datetime) -> tuple[str, str]:
    """(STATE, why): ok, RENEW or EXPIRED, by the rule the renewal itself applies."""
    if info.expired(now):
        return "EXPIRED", ""
    if info.name == pki.ROOT_NAME:
        due = info.past_half_life(now)
        return (
            ("RENEW", "past half its lifetime: a new PKI is needed before it expires") if due else ("ok", "")
        )
    if info.name == pki.INTERMEDIATE_NAME:
        if pki.intermediate_due(paths, now):
            return "RENEW", "past half its lifetime: tradeguard pki rotate-intermediate"
        return "ok", ""
    reason = pki.renewal_reason(paths, info.name, now)
    return ("ok", "") if reason is None else ("RENEW", reason)


def cmd_status(args: argparse.Namespace) -> int:
    paths = _paths(args)
    now = datetime.now(UTC)
    try:
        infos = pki.status(paths)
        if not infos:
            return _fail(f"no certificates in {paths.dir} (run: tradeguard pki init)")
        rows = [("NAME", "SPIFFE ID", "NOT AFTER (UTC)", "REMAINING", "STATE", "WHY")]
        for info in infos:
            state, why = _state(paths, info, now)
            rows.append(
                (
                    info.name,
                    info.spiffe_id or "-",
                    f"{info.not_after:%Y-%m-%d %H:%M:%S}",
                    _human(info.remaining(now)),
                    state,
                    why,
                )
            )
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    listed = {info.name for info in infos}
    for path in sorted(paths.dir.glob("*.crt")):
        if path.stem not in listed and path != paths.ca_bundle:
            rows.append((path.stem, "-", "-", "-", "UNREADABLE", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0
