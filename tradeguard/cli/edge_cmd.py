"""``tradeguard edge render``: the Envoy edge's configuration (deploy/envoy) for the place it runs in."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath

from tradeguard import edge
from tradeguard.cli import common
from tradeguard.mesh import pki


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "edge",
        help="the Envoy HTTP edge's configuration",
        description="The Envoy HTTP edge (deploy/envoy, deploy/README.md).",
        formatter_class=common.HelpFormatter,
    )
    common.add_home_option(parser)
    commands = parser.add_subparsers(dest="edge_command", metavar="COMMAND", required=True)
    render = commands.add_parser(
        "render",
        help="write deploy/envoy with other upstream addresses, ports, paths or trust domain",
        description="Write a copy of deploy/envoy (edge.yaml, sds/, tradeguard.pb) into OUT in which only the "
        "upstream addresses, the listening and admin addresses, the three directories Envoy reads and the "
        "upstreams' trust domain differ. Upstream ports default to TRADEGUARD_<SERVICE>_PORT (else the "
        "registry's), hosts to --upstream-host; a DNS name makes a STRICT_DNS cluster. Run Envoy with "
        "`envoy -c <config-dir>/edge.yaml`.",
        formatter_class=common.HelpFormatter,
    )
    common.add_home_option(render)
    render.add_argument("out", metavar="OUT", type=Path, help="directory to write into")
    render.add_argument(
        "--upstream-host",
        default=None,
        help="host of every upstream (IP address or DNS name; default: where the local suite listens)",
    )
    render.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help=f"one upstream's address (NAME one of {', '.join(edge.UPSTREAMS)}); repeatable",
    )
    render.add_argument("--listen", default="0.0.0.0:8443", help="where the edge listens for clients")
    render.add_argument("--admin", default="127.0.0.1:9901", help="the admin API (loopback only)")
    render.add_argument(
        "--config-dir",
        default=str(edge.MOUNT / "envoy"),
        help="where Envoy will find OUT's files (OUT itself to run Envoy on this host)",
    )
    render.add_argument(
        "--identity-dir",
        default=str(edge.MOUNT / "edge"),
        help="where Envoy will find the edge's bundle ($TRADEGUARD_HOME/edge, from `tradeguard pki`)",
    )
    render.add_argument(
        "--public-dir", default=str(edge.MOUNT / "public"), help="where Envoy will find tls.crt and tls.key"
    )
    render.add_argument(
        "--trust-domain",
        default=None,
        help="the upstreams' SPIFFE trust domain (default: the home's PKI's, else tradeguard.local)",
    )
    render.set_defaults(func=cmd_render)


def _layout(args: argparse.Namespace) -> edge.EdgeLayout:
    host = args.upstream_host or common.connect_host()
    upstreams = {name: edge.Endpoint(host, common.service_port(name)) for name in edge.UPSTREAMS}
    for given in args.upstream:
        name, sep, address = given.partition("=")
        if not sep or name not in edge.UPSTREAMS:
            raise ValueError(f"--upstream {given!r}: expected NAME=HOST:PORT, NAME one of {edge.UPSTREAMS}")
        upstreams[name] = edge.Endpoint.parse(address)
    trust_domain = args.trust_domain
    if trust_domain is None:
        paths = pki.PkiPaths(args.home)
        trust_domain = pki.trust_domain(paths) if paths.trust_domain_file.exists() else edge.TRUST_DOMAIN
    return edge.EdgeLayout(
        config_dir=PurePosixPath(args.config_dir),
        identity_dir=PurePosixPath(args.identity_dir),
        public_dir=PurePosixPath(args.public_dir),
        listen=edge.Endpoint.parse(args.listen),
        admin=edge.Endpoint.parse(args.admin),
        upstreams=upstreams,
        trust_domain=trust_domain,
    )


def cmd_render(args: argparse.Namespace) -> int:
    try:
        layout = _layout(args)
        written = edge.write(layout, args.out)
    except (OSError, ValueError) as error:
        print(f"tradeguard edge render: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    for name, endpoint in sorted(layout.upstreams.items()):
        print(f"  {name:<9} -> {endpoint.host}:{endpoint.port}")
    print(f"run: envoy -c {layout.config_dir}/edge.yaml")
    return 0
