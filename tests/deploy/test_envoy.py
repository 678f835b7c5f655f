"""The Envoy edge (deploy/envoy): parsed into Envoy's own messages (xds-protos), then held to our security rules.

The fast checks: the config is checked the way Envoy would first check it (every field and every typed_config
must exist in Envoy's API) and then against the rules a security reviewer would read it for. `violations()` is
the reviewer; the misuse tests show that it catches each weakened variant. The renderer (`tradeguard edge
render`) is held to the same rules. The real Envoy runs it in test_edge_api.py and test_edge_process.py.
"""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, json_format

from services.ratelimit import rls
from services.trading import policy as trading_policy
from tradeguard import edge as edge_render
from tradeguard.cli.main import main as cli_main
from tradeguard.mesh import pki
from tradeguard.registry import SERVICES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
MOUNT = Path("/etc/tradeguard")  # where deploy/README.md mounts things in the Envoy container
TRUST_DOMAIN = "tradeguard.local"  # `tradeguard pki init`'s default
TRADING_SERVICE = "tradeguard.trading.v1.TradingService"
TLS13 = common_pb2.TlsParameters.TLSv1_3
HSTS_MIN_AGE_S = 31_536_000  # one year: the floor for HSTS preload lists


def _typed_configs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "@type" in node:
            yield node["@type"]
        for value in node.values():
            yield from _typed_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _typed_configs(value)


def _import_types(config: Any) -> None:
    """Import the module of every typed_config type named in `config`, so that Any fields can be parsed."""
    for type_url in set(_typed_configs(config)):
        package = importlib.import_module(type_url.split("/", 1)[1].rsplit(".", 1)[0])
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.endswith("_pb2"):
                importlib.import_module(f"{package.__name__}.{module.name}")


def _load(path: Path) -> Any:
    config = yaml.safe_load(path.read_text())
    _import_types(config)
    return config


def parse_bootstrap(config: Any) -> bootstrap_pb2.Bootstrap:
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap())


def _unpack(any_msg: Any, message: Any) -> Any:
    assert any_msg.Unpack(message), f"{any_msg.type_url} is not {message.DESCRIPTOR.full_name}"
    return message


def _hcm(bootstrap: bootstrap_pb2.Bootstrap) -> hcm_pb2.HttpConnectionManager:
    [listener] = bootstrap.static_resources.listeners
    [chain] = listener.filter_chains
    [network_filter] = chain.filters
    return _unpack(network_filter.typed_config, hcm_pb2.HttpConnectionManager())


def _hsts_strong(value: str) -> bool:
    """A Strict-Transport-Security value of a year or more that covers subdomains."""
    directives = {name.strip(): arg.strip() for name, _, arg in (d.partition("=") for d in value.split(";"))}
    max_age = directives.get("max-age", "")
    return "includeSubDomains" in directives and max_age.isdigit() and int(max_age) >= HSTS_MIN_AGE_S


def _descriptor_key(action: Any) -> str:
    kind = action.WhichOneof("action_specifier")
    return str(getattr(action, kind).descriptor_key)


def _rate_limit_violations(route: Any) -> list[str]:
    """A routed path must be rate limited per principal and method, by descriptors Envoy always sends: an action
    that finds no value and has no default drops its whole descriptor, and the request goes unlimited."""
    prefix = route.match.prefix
    if not route.route.rate_limits:
        return [f"route {prefix} is not rate limited"]
    found: list[str] = []
    for limit in route.route.rate_limits:
        keys = {_descriptor_key(action) for action in limit.actions}
        if not {"principal", "method"} <= keys:
            found.append(f"route {prefix}: a rate-limit descriptor not keyed by principal and method")
        for action in limit.actions:
            kind = action.WhichOneof("action_specifier")
            if kind == "metadata" and not action.metadata.default_value:
                found.append(f"route {prefix}: rate-limit action {_descriptor_key(action)} has no default")
            elif kind == "request_headers" and action.request_headers.header_name != ":path":
                found.append(f"route {prefix}: rate-limit action on a header a client may leave out")
    return found


def violations(bootstrap: bootstrap_pb2.Bootstrap) -> list[str]:
    """Every rule of the edge that `bootstrap` breaks (empty when it keeps them all)."""
    found: list[str] = []
    if not bootstrap.node.id or not bootstrap.node.cluster:
        found.append("no node id and cluster: Envoy refuses to start with file-based SDS")
    admin = bootstrap.admin.address.socket_address
    if admin.address not in ("127.0.0.1", "::1"):
        found.append(f"admin listens on {admin.address}, not loopback")

    for listener in bootstrap.static_resources.listeners:
        for chain in listener.filter_chains:
            if chain.transport_socket.name != "envoy.transport_sockets.tls":
                found.append(f"listener {listener.name}: a filter chain without TLS")
                continue
            tls = _unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext())
            if tls.common_tls_context.tls_params.tls_minimum_protocol_version != TLS13:
                found.append(f"listener {listener.name}: TLS minimum below 1.3")

    hcm = _hcm(bootstrap)
    if not hcm.use_remote_address.value:
        found.append("X-Forwarded-For from clients trusted (use_remote_address off)")
    underscores = hcm.common_http_protocol_options.headers_with_underscores_action
    if underscores != protocol_pb2.HttpProtocolOptions.REJECT_REQUEST:
        found.append("headers with underscores not rejected")
    escaped = hcm.path_with_escaped_slashes_action
    if not hcm.normalize_path.value or escaped != hcm_pb2.HttpConnectionManager.REJECT_REQUEST:
        found.append("paths not normalised, or escaped slashes not rejected")

    names = [f.name for f in hcm.http_filters]
    order = [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    if names != order:
        found.append(f"HTTP filters {names}, not {order}")
    by_name = {f.name: f.typed_config for f in hcm.http_filters}
    if "envoy.filters.http.header_mutation" in by_name:
        mutation = _unpack(
            by_name["envoy.filters.http.header_mutation"], header_mutation_pb2.HeaderMutation()
        )
        hsts = [
            m.append.header.value
            for m in mutation.mutations.response_mutations
            if m.append.header.key.lower() == "strict-transport-security"
        ]
        if len(hsts) != 1 or not _hsts_strong(hsts[0]):
            found.append("no HSTS of a year or more on every response")
    if "envoy.filters.http.ext_authz" in by_name:
        authz = _unpack(by_name["envoy.filters.http.ext_authz"], ext_authz_pb2.ExtAuthz())
        if authz.failure_mode_allow:
            found.append("ext_authz fails open")
        if not authz.with_request_body.pack_as_bytes or authz.with_request_body.allow_partial_message:
            found.append("ext_authz does not get the whole raw body (HMAC signatures are over it)")
    if "envoy.filters.http.ratelimit" in by_name:
        limit = _unpack(by_name["envoy.filters.http.ratelimit"], rate_limit_pb2.RateLimit())
        if not limit.failure_mode_deny:
            found.append("rate limiting fails open")

    for host in hcm.route_config.virtual_hosts:
        for route in host.routes:
            if route.HasField("route"):
                found.extend(_rate_limit_violations(route))
            elif route.HasField("direct_response") and route.direct_response.status < 400:
                found.append(f"route {route.match.prefix} answers {route.direct_response.status} itself")

    for cluster in bootstrap.static_resources.clusters:
        if cluster.transport_socket.name != "envoy.transport_sockets.tls":
            found.append(f"cluster {cluster.name}: no TLS to the upstream")
            continue
        tls = _unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext()).common_tls_context
        if tls.tls_params.tls_minimum_protocol_version != TLS13:
            found.append(f"cluster {cluster.name}: TLS minimum below 1.3")
        if not tls.tls_certificate_sds_secret_configs:
            found.append(f"cluster {cluster.name}: no client certificate (the mesh requires one)")
        expected = pki.spiffe_id(TRUST_DOMAIN, cluster.name)
        sans = [
            (m.san_type, m.matcher.exact)
            for m in tls.combined_validation_context.default_validation_context.match_typed_subject_alt_names
        ]
        if sans != [(common_pb2.SubjectAltNameMatcher.URI, expected)]:
            found.append(f"cluster {cluster.name}: upstream not pinned to {expected}")
    return found


@pytest.fixture(scope="module")
def edge_config() -> Any:
    return _load(DEPLOY / "edge.yaml")


@pytest.fixture(scope="module")
def edge(edge_config: Any) -> bootstrap_pb2.Bootstrap:
    return parse_bootstrap(edge_config)


def test_edge_parses_as_envoy_bootstrap_and_keeps_every_rule(edge: bootstrap_pb2.Bootstrap) -> None:
    assert violations(edge) == []


def _local(path: str) -> Path:
    """A path as Envoy sees it, mapped to the repository for files that deploy/envoy ships."""
    return DEPLOY / Path(path).relative_to(MOUNT / "envoy")


def _sds_refs(bootstrap: bootstrap_pb2.Bootstrap) -> Iterator[Any]:
    """Every SDS secret reference in the bootstrap (listener and cluster TLS contexts)."""
    contexts = [
        _unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext()).common_tls_context
        for listener in bootstrap.static_resources.listeners
        for chain in listener.filter_chains
    ] + [
        _unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext()).common_tls_context
        for cluster in bootstrap.static_resources.clusters
    ]
    for context in contexts:
        yield from context.tls_certificate_sds_secret_configs
        if context.HasField("combined_validation_context"):
            yield context.combined_validation_context.validation_context_sds_secret_config


def test_every_sds_secret_is_shipped_and_reads_only_the_published_edge_bundle(
    edge: bootstrap_pb2.Bootstrap,
) -> None:
    identity = MOUNT / "edge"  # $TRADEGUARD_HOME/edge: `current` -> ca.crt, edge.crt, edge.key
    secrets: dict[str, secret_pb2.Secret] = {}
    refs = list(_sds_refs(edge))
    for ref in refs:
        source = ref.sds_config.path_config_source
        config = _load(_local(source.path))
        assert not [f for f in edge_render.referenced_files(config) if f.startswith(str(MOUNT / "pki"))]
        response = json_format.ParseDict(config, discovery_pb2.DiscoveryResponse())
        [resource] = response.resources
        secret = _unpack(resource, secret_pb2.Secret())
        assert secret.name == ref.name
        assert source.watched_directory.path == str(Path(source.path).parent)  # re-read when rotated
        secrets[secret.name] = secret
    assert {r.name for r in refs} == {"edge-public", "edge-mesh", "mesh-ca"}
    mesh = secrets["edge-mesh"].tls_certificate
    assert (mesh.certificate_chain.filename, mesh.private_key.filename) == (
        str(identity / pki.CURRENT / "edge.crt"),
        str(identity / pki.CURRENT / "edge.key"),
    )
    assert mesh.watched_directory.path == str(identity)  # where `current` is swapped
    ca = secrets["mesh-ca"].validation_context
    assert ca.trusted_ca.filename == str(identity / pki.CURRENT / "ca.crt")
    assert ca.watched_directory.path == str(identity)


def test_trading_upstream_is_the_trading_service_and_lets_the_edge_call_every_routed_method(
    edge: bootstrap_pb2.Bootstrap,
) -> None:
    clusters = {c.name: c for c in edge.static_resources.clusters}
    assert "trading" in clusters
    for name, cluster in clusters.items():  # every upstream of ours is at its registered port
        if name in SERVICES:
            [endpoint] = cluster.load_assignment.endpoints[0].lb_endpoints
            assert endpoint.endpoint.address.socket_address.port_value == SERVICES[name].port, name
    hcm = _hcm(edge)
    routed = {r.match.prefix for h in hcm.route_config.virtual_hosts for r in h.routes if r.HasField("route")}
    assert routed == {f"/{TRADING_SERVICE}/"}
    # the descriptor the transcoder loads is the one `make proto` writes, and holds the service it exposes
    by_name = {f.name: f.typed_config for f in hcm.http_filters}
    transcoder = _unpack(
        by_name["envoy.filters.http.grpc_json_transcoder"], transcoder_pb2.GrpcJsonTranscoder()
    )
    assert list(transcoder.services) == [TRADING_SERVICE]
    assert transcoder.request_validation_options.reject_unknown_method
    files = descriptor_pb2.FileDescriptorSet.FromString(_local(transcoder.proto_descriptor).read_bytes())
    [service] = [s for f in files.file for s in f.service if f"{f.package}.{s.name}" == TRADING_SERVICE]
    methods = {f"/{TRADING_SERVICE}/{m.name}" for m in service.method}
    assert methods == set(trading_policy.RULES)
    assert all("edge" in trading_policy.RULES[m] for m in methods)


def test_the_rate_limit_descriptor_and_headers_are_what_the_rate_limit_service_reads_and_writes(
    edge: bootstrap_pb2.Bootstrap,
) -> None:
    hcm = _hcm(edge)
    [route] = [r for h in hcm.route_config.virtual_hosts for r in h.routes if r.HasField("route")]
    [limit] = route.route.rate_limits
    entries = {}
    for action in limit.actions:
        kind = action.WhichOneof("action_specifier")
        if kind == "metadata":
            metadata = action.metadata
            assert metadata.source == metadata.DYNAMIC
            assert metadata.metadata_key.key == "envoy.filters.http.ext_authz"
            [segment] = metadata.metadata_key.path
            assert segment.key == metadata.descriptor_key  # ext_authz's metadata names (services/auth)
            entries[metadata.descriptor_key] = metadata.default_value
        else:
            assert kind == "request_headers"
            entries[action.request_headers.descriptor_key] = action.request_headers.header_name
    # the entries ShouldRateLimit reads (services/ratelimit/rls.py); no API key and no tier are its NO_VALUE (a
    # bearer call: limited as its user; the limits file's default tier)
    assert list(entries) == list(rls.ENTRIES)
    assert entries == {
        "principal": "unauthenticated",
        "key": rls.NO_VALUE,
        "tier": rls.NO_VALUE,
        "method": ":path",
    }
    by_name = {f.name: f.typed_config for f in hcm.http_filters}
    limiter = _unpack(by_name["envoy.filters.http.ratelimit"], rate_limit_pb2.RateLimit())
    assert limiter.domain == rls.DOMAIN
    assert (limiter.failure_mode_deny, limiter.status_on_error.code) == (True, 503)
    # RateLimit-* and Retry-After come from the service; Envoy's own X-RateLimit-* would repeat them
    assert limiter.enable_x_ratelimit_headers == rate_limit_pb2.RateLimit.OFF
    assert limiter.disable_x_envoy_ratelimited_header
    assert limiter.rate_limited_as_resource_exhausted  # a gRPC client sees what the guard would answer


def _mutate(config: Any, change: Callable[[Any], None]) -> bootstrap_pb2.Bootstrap:
    weakened = copy.deepcopy(config)
    change(weakened)
    return parse_bootstrap(weakened)


def _hcm_dict(config: Any) -> Any:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _filter(config: Any, name: str) -> Any:
    [found] = [f for f in _hcm_dict(config)["http_filters"] if f["name"] == name]
    return found["typed_config"]


def _cluster_tls(config: Any, name: str) -> Any:
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return cluster["transport_socket"]["typed_config"]["common_tls_context"]


def _downstream_tls12(c: Any) -> None:
    chain = c["static_resources"]["listeners"][0]["filter_chains"][0]
    chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_params"] = {
        "tls_minimum_protocol_version": "TLSv1_2"
    }


def _upstream_tls12(c: Any) -> None:
    _cluster_tls(c, "auth")["tls_params"] = {"tls_minimum_protocol_version": "TLSv1_2"}


def _hsts_after_authz(c: Any) -> None:
    filters = _hcm_dict(c)["http_filters"]
    filters.insert(1, filters.pop(0))


def _short_hsts(c: Any) -> None:
    header = _filter(c, "envoy.filters.http.header_mutation")["mutations"]["response_mutations"][0]
    header["append"]["header"]["value"] = "max-age=300; includeSubDomains"


def _hsts_without_subdomains(c: Any) -> None:
    header = _filter(c, "envoy.filters.http.header_mutation")["mutations"]["response_mutations"][0]
    header["append"]["header"]["value"] = "max-age=63072000"


def _unpinned_upstream(c: Any) -> None:
    context = _cluster_tls(c, "trading")["combined_validation_context"]
    context["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"] = (
        "spiffe://tradeguard.local/svc/ops"
    )


def _unlimited_route(c: Any) -> None:
    del _hcm_dict(c)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["rate_limits"]


def _limit_actions(c: Any) -> Any:
    return _hcm_dict(c)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["rate_limits"][0]["actions"]


def _action(c: Any, key: str) -> Any:
    [found] = [a for a in _limit_actions(c) if next(iter(a.values()))["descriptor_key"] == key]
    return found


def _tier_without_default(c: Any) -> None:
    del _action(c, "tier")["metadata"]["default_value"]


def _limited_per_method_only(c: Any) -> None:
    _limit_actions(c).remove(_action(c, "principal"))


def _limited_by_a_client_header(c: Any) -> None:
    _action(c, "method")["request_headers"]["header_name"] = "x-client-method"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.pop("node"), "node id"),
        (lambda c: c["admin"]["address"]["socket_address"].update(address="0.0.0.0"), "admin listens"),
        (_downstream_tls12, "listener edge_https: TLS minimum below 1.3"),
        (
            lambda c: c["static_resources"]["listeners"][0]["filter_chains"][0].pop("transport_socket"),
            "without TLS",
        ),
        (_upstream_tls12, "cluster auth: TLS minimum below 1.3"),
        (
            lambda c: _filter(c, "envoy.filters.http.ext_authz").update(failure_mode_allow=True),
            "ext_authz fails open",
        ),
        (lambda c: _filter(c, "envoy.filters.http.ext_authz").pop("with_request_body"), "raw body"),
        (lambda c: _filter(c, "envoy.filters.http.ratelimit").update(failure_mode_deny=False), "fails open"),
        (_hsts_after_authz, "HTTP filters"),
        (_short_hsts, "HSTS"),
        (_hsts_without_subdomains, "HSTS"),
        (_unpinned_upstream, "cluster trading: upstream not pinned"),
        (
            lambda c: _cluster_tls(c, "ratelimit").pop("tls_certificate_sds_secret_configs"),
            "no client certificate",
        ),
        (_unlimited_route, "not rate limited"),
        (_tier_without_default, "rate-limit action tier has no default"),
        (_limited_per_method_only, "not keyed by principal and method"),
        (_limited_by_a_client_header, "a header a client may leave out"),
        (lambda c: _hcm_dict(c).update(use_remote_address=False), "X-Forwarded-For"),
        (
            lambda c: _hcm_dict(c)["common_http_protocol_options"].pop("headers_with_underscores_action"),
            "underscores",
        ),
    ],
)
def test_each_weakened_edge_is_caught(edge_config: Any, change: Callable[[Any], None], expected: str) -> None:
    found = violations(_mutate(edge_config, change))
    assert any(expected in v for v in found), found


def test_a_misspelt_field_is_refused_as_envoy_would(edge_config: Any) -> None:
    weakened = copy.deepcopy(edge_config)
    _hcm_dict(weakened)["use_remote_adress"] = True
    with pytest.raises(json_format.ParseError, match="use_remote_adress"):
        parse_bootstrap(weakened)


# --- the renderer: deploy/envoy for other addresses, ports, paths and trust domain ----------------------------


def _rendered(layout: edge_render.EdgeLayout) -> dict[str, Any]:
    rendered = edge_render.render(layout)
    return {name: yaml.safe_load(text) for name, text in rendered.items()}


def _plain(config: Any) -> Any:
    return json.loads(json.dumps(config))  # YAML anchors as plain copies, as the renderer writes them


def test_rendering_the_defaults_gives_deploy_envoy_back() -> None:
    rendered = _rendered(edge_render.EdgeLayout())
    assert rendered == {
        name: _plain(yaml.safe_load((DEPLOY / name).read_text())) for name in edge_render.FILES
    }


def test_a_rendered_edge_keeps_every_rule_and_changes_only_places() -> None:
    layout = edge_render.EdgeLayout(
        config_dir=Path("/srv/edge/envoy"),
        identity_dir=Path("/srv/edge/identity"),
        public_dir=Path("/srv/edge/public"),
        listen=edge_render.Endpoint("127.0.0.1", 18443),
        admin=edge_render.Endpoint("::1", 19901),
        upstreams={
            "trading": edge_render.Endpoint("trading.internal", 7000),
            "auth": edge_render.Endpoint("10.1.2.3", 7001),
        },
        trust_domain="example.org",
    )
    rendered = _rendered(layout)
    config = rendered["edge.yaml"]
    _import_types(config)
    bootstrap = parse_bootstrap(config)
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    addresses = {
        name: (
            cluster.type,
            cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address,
            cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value,
        )
        for name, cluster in clusters.items()
    }
    static, dns = cluster_pb2.Cluster.STATIC, cluster_pb2.Cluster.STRICT_DNS
    assert addresses == {
        "trading": (dns, "trading.internal", 7000),
        "auth": (static, "10.1.2.3", 7001),
        "ratelimit": (static, "127.0.0.1", SERVICES["ratelimit"].port),  # not given: the registry's
    }
    assert bootstrap.admin.address.socket_address.address == "::1"
    assert bootstrap.static_resources.listeners[0].address.socket_address.port_value == 18443
    # the rules hold, with the upstreams pinned to the other trust domain
    found = violations(bootstrap)
    assert found == [f"cluster {n}: upstream not pinned to spiffe://{TRUST_DOMAIN}/svc/{n}" for n in clusters]
    for name, cluster in clusters.items():
        tls = _unpack(cluster.transport_socket.typed_config, tls_pb2.UpstreamTlsContext())
        sans = tls.common_tls_context.combined_validation_context.default_validation_context
        assert [m.matcher.exact for m in sans.match_typed_subject_alt_names] == [
            f"spiffe://example.org/svc/{name}"
        ]
    # every file Envoy will read is under the three directories given, none under the defaults
    files = [f for text in rendered.values() for f in edge_render.referenced_files(text)]
    assert files and all(f.startswith("/srv/edge/") for f in files), files
    # and nothing else changed
    reference = _plain(yaml.safe_load((DEPLOY / "edge.yaml").read_text()))
    assert _without_places(config) == _without_places(_plain(edge_render._strings(reference, _unplace)))


def _unplace(value: str) -> str:
    for old, new in (
        ("/etc/tradeguard/envoy", "/srv/edge/envoy"),
        ("/etc/tradeguard/edge", "/srv/edge/identity"),
        ("/etc/tradeguard/public", "/srv/edge/public"),
        (f"spiffe://{TRUST_DOMAIN}/", "spiffe://example.org/"),
    ):
        if value.startswith(old):
            return new + value[len(old) :]
    return value


def _without_places(config: Any) -> Any:
    config = copy.deepcopy(config)
    del config["admin"]["address"]
    del config["static_resources"]["listeners"][0]["address"]
    for cluster in config["static_resources"]["clusters"]:
        del cluster["type"], cluster["load_assignment"]
        cluster.pop("dns_lookup_family", None)
    return config


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"admin": edge_render.Endpoint("0.0.0.0", 9901)}, "loopback"),
        ({"admin": edge_render.Endpoint("localhost", 9901)}, "loopback"),
        ({"upstreams": {"keyvault": edge_render.Endpoint("127.0.0.1", 1)}}, "unknown upstream"),
        ({"trust_domain": "Not A Domain"}, "trust domain"),
    ],
)
def test_the_renderer_refuses_an_exposed_admin_an_unknown_upstream_and_a_bad_trust_domain(
    change: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        edge_render.EdgeLayout(**change)


def test_endpoints_parse_hosts_and_ports() -> None:
    assert edge_render.Endpoint.parse("trading:50055") == edge_render.Endpoint("trading", 50055)
    assert edge_render.Endpoint.parse("[::1]:9901") == edge_render.Endpoint("::1", 9901)
    for bad in ("trading", "trading:", "trading:x", ":1", "a b:1", "h:70000"):
        with pytest.raises(ValueError):
            edge_render.Endpoint.parse(bad)


def test_tradeguard_edge_render_takes_the_suites_ports_and_trust_domain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    pki.init_ca(pki.PkiPaths(home), "corp.example")
    monkeypatch.setenv("TRADEGUARD_TRADING_PORT", "6055")
    out = tmp_path / "out"
    code = cli_main(
        [
            "edge",
            "render",
            str(out),
            "--home",
            str(home),
            "--upstream-host",
            "host.internal",
            "--upstream",
            "auth=10.0.0.5:6051",
            "--config-dir",
            str(out),
            "--listen",
            "127.0.0.1:8443",
        ]
    )
    assert code == 0
    config = yaml.safe_load((out / "edge.yaml").read_text())
    _import_types(config)
    bootstrap = parse_bootstrap(config)
    ports = {
        c.name: c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        for c in bootstrap.static_resources.clusters
    }
    assert {n: (a.address, a.port_value) for n, a in ports.items()} == {
        "trading": ("host.internal", 6055),
        "auth": ("10.0.0.5", 6051),
        "ratelimit": ("host.internal", SERVICES["ratelimit"].port),
    }
    assert (out / "tradeguard.pb").read_bytes() == (DEPLOY / "tradeguard.pb").read_bytes()
    hcm = _hcm(bootstrap)
    transcoder = _unpack(
        {f.name: f.typed_config for f in hcm.http_filters}["envoy.filters.http.grpc_json_transcoder"],
        transcoder_pb2.GrpcJsonTranscoder(),
    )
    assert transcoder.proto_descriptor == str(out / "tradeguard.pb")
    assert "spiffe://corp.example/svc/trading" in (out / "edge.yaml").read_text()
    assert cli_main(["edge", "render", str(out), "--admin", "0.0.0.0:9901"]) == 2


def test_the_descriptor_holds_google_rpc_status_and_its_details_for_json_errors() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString((DEPLOY / "tradeguard.pb").read_bytes())
    names = {f.name for f in files.file}
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto"} <= names
    messages = {f"{f.package}.{m.name}" for f in files.file for m in f.message_type}
    assert {"google.rpc.Status", "google.rpc.ErrorInfo", "google.rpc.BadRequest"} <= messages
