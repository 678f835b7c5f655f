"""The Envoy edge's configuration (deploy/envoy), rendered for the place it runs in.

deploy/envoy is the reference and runs as it is (`envoy -c /etc/tradeguard/envoy/edge.yaml` with the mounts
deploy/README.md lists, the services on the registry's ports on the same host). `render` makes a copy of it in
which only these change: where its three directories are (its configuration, the edge's identity bundle that
`tradeguard pki` publishes, the public certificate), where it listens, where its admin API listens (loopback
only), and where each upstream is (an IP address makes a STATIC cluster, a DNS name a STRICT_DNS one, so a
container can name the services), and the trust domain the upstreams' SPIFFE IDs are pinned to. Everything else, the security rules included, is deploy/envoy's.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tradeguard import registry
from tradeguard.mesh import pki

__all__ = ["DEPLOY", "MOUNT", "UPSTREAMS", "EdgeLayout", "Endpoint", "render", "write"]

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "envoy"  # the reference configuration
MOUNT = PurePosixPath("/etc/tradeguard")  # where deploy/envoy expects its directories
UPSTREAMS = ("auth", "ratelimit", "trading")  # the edge's clusters, each a registered service
TRUST_DOMAIN = "tradeguard.local"  # deploy/envoy's (`tradeguard pki init`'s default)
FILES = ("edge.yaml", "sds/edge-mesh.yaml", "sds/edge-public.yaml", "sds/mesh-ca.yaml")
DESCRIPTOR = "tradeguard.pb"


@dataclass(frozen=True)
class Endpoint:
    """A host (IP address or DNS name) and a port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host or any(c in self.host for c in " /[]"):
            raise ValueError(f"invalid host {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"invalid port {self.port}")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """`host:port`, `[v6]:port`."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{text!r} is not HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host, int(port))

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def socket_address(self) -> dict[str, Any]:
        return {"address": self.host, "port_value": self.port}


def _registry_upstreams() -> dict[str, Endpoint]:
    return {name: Endpoint("127.0.0.1", registry.lookup(name).port) for name in UPSTREAMS}


@dataclass(frozen=True)
class EdgeLayout:
    """Where the edge's files are and where it listens and connects. The defaults are deploy/envoy's own."""

    config_dir: PurePosixPath | Path = MOUNT / "envoy"  # edge.yaml, sds/, tradeguard.pb
    identity_dir: PurePosixPath | Path = MOUNT / "edge"  # `current/` -> ca.crt, edge.crt, edge.key
    public_dir: PurePosixPath | Path = MOUNT / "public"  # tls.crt, tls.key
    listen: Endpoint = Endpoint("0.0.0.0", 8443)  # noqa: S104 - the edge faces the clients
    admin: Endpoint = Endpoint("127.0.0.1", 9901)
    upstreams: Mapping[str, Endpoint] = field(default_factory=_registry_upstreams)
    trust_domain: str = TRUST_DOMAIN  # each upstream must present spiffe://<trust_domain>/svc/<its name>

    def __post_init__(self) -> None:
        pki.spiffe_id(self.trust_domain, "edge")  # raises ValueError for a malformed trust domain
        if not self.admin.is_ip or not ipaddress.ip_address(self.admin.host).is_loopback:
            raise ValueError(f"the admin API must listen on loopback, not {self.admin.host}")
        unknown = set(self.upstreams) - set(UPSTREAMS)
        if unknown:
            raise ValueError(
                f"unknown upstream {sorted(unknown)}; the edge's upstreams are {list(UPSTREAMS)}"
            )


def _strings(node: Any, change: Any) -> Any:
    """`node` with every string passed through `change`."""
    if isinstance(node, dict):
        return {key: _strings(value, change) for key, value in node.items()}
    if isinstance(node, list):
        return [_strings(value, change) for value in node]
    return change(node) if isinstance(node, str) else node


def _relocate(layout: EdgeLayout) -> Any:
    moves = {
        str(MOUNT / "envoy"): str(layout.config_dir),
        str(MOUNT / "edge"): str(layout.identity_dir),
        str(MOUNT / "public"): str(layout.public_dir),
        f"spiffe://{TRUST_DOMAIN}": f"spiffe://{layout.trust_domain}",
    }

    def change(value: str) -> str:
        for old, new in moves.items():
            if value == old or value.startswith(old + "/"):
                return new + value[len(old) :]
        return value

    return change


def _place(config: Any, layout: EdgeLayout) -> None:
    """Set the admin, listener and upstream addresses of a parsed edge.yaml."""
    config["admin"]["address"]["socket_address"] = layout.admin.socket_address()
    [listener] = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = layout.listen.socket_address()
    upstreams = {**_registry_upstreams(), **layout.upstreams}
    for cluster in config["static_resources"]["clusters"]:
        endpoint = upstreams[cluster["name"]]
        cluster["type"] = "STATIC" if endpoint.is_ip else "STRICT_DNS"
        if not endpoint.is_ip:  # services that listen on IPv4 only (the default) are still reached
            cluster["dns_lookup_family"] = "V4_PREFERRED"
        [locality] = cluster["load_assignment"]["endpoints"]
        [lb_endpoint] = locality["lb_endpoints"]
        lb_endpoint["endpoint"]["address"]["socket_address"] = endpoint.socket_address()


def _load(path: Path) -> Any:
    # through JSON: YAML anchors become plain copies, so one change never lands in two places
    return json.loads(json.dumps(yaml.safe_load(path.read_text())))


def render(layout: EdgeLayout, source: Path = DEPLOY) -> dict[str, str]:
    """The edge's YAML files (relative name -> text) for `layout`, from the reference in `source`."""
    out: dict[str, str] = {}
    for name in FILES:
        config = _strings(_load(source / name), _relocate(layout))
        if name == "edge.yaml":
            _place(config, layout)
        header = f"# Rendered from deploy/envoy/{name} (its comments say why each setting is there).\n"
        out[name] = header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return out


def write(layout: EdgeLayout, out: Path, source: Path = DEPLOY) -> list[Path]:
    """Render into `out` (edge.yaml, sds/, and the transcoder's descriptor); the files written."""
    written: list[Path] = []
    for name, text in render(layout, source).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    shutil.copyfile(source / DESCRIPTOR, out / DESCRIPTOR)
    written.append(out / DESCRIPTOR)
    return written


def referenced_files(config: Any) -> Iterator[str]:
    """Every `filename`, `path` and `proto_descriptor` a parsed edge file names (what Envoy will read)."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key in ("filename", "path", "proto_descriptor") and isinstance(value, str):
                yield value
            else:
                yield from referenced_files(value)
    elif isinstance(config, list):
        for value in config:
            yield from referenced_files(value)
