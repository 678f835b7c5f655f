"""Caller authorisation by SPIFFE ID: an allow-list of workload names per method, deny by default."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from tradeguard.errors import PermissionDenied
from tradeguard.mesh.identity import SpiffeId, peer_spiffe_id
from tradeguard.observability.logging import get_logger
from tradeguard.rpc.handlers import Context, WrappingInterceptor, wrap_handler
from tradeguard.rpc.interceptor import abort_with

ANY_WORKLOAD = "*"
HEALTH = "/grpc.health.v1.Health/*"
REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/*", "/grpc.reflection.v1.ServerReflection/*")

_log = get_logger("tradeguard.authz")


def kit_rules() -> dict[str, frozenset[str]]:
    """What every service allows besides its own methods: health to any workload, reflection to ops."""
    rules = {HEALTH: frozenset({ANY_WORKLOAD})}
    rules.update({method: frozenset({"ops"}) for method in REFLECTION})
    return rules


class MethodPolicy:
    """Rules map a full method ("/pkg.Service/Method") or a whole service ("/pkg.Service/*") to the
    workload names allowed to call it ("*" for any workload of the trust domain). Methods without a
    rule are denied, and so is every caller outside the trust domain."""

    def __init__(self, trust_domain: str, rules: Mapping[str, Iterable[str]], *, with_kit_rules: bool = True):
        self.trust_domain = trust_domain
        merged: dict[str, frozenset[str]] = kit_rules() if with_kit_rules else {}
        for method, names in rules.items():
            if not method.startswith("/") or method.count("/") != 2:
                raise ValueError(
                    f"policy rule {method!r} is not /package.Service/Method or /package.Service/*"
                )
            merged[method] = frozenset(names)
        self._rules = merged
        self._decisions: dict[tuple[str, str], bool] = {}

    def allowed_names(self, method: str) -> frozenset[str]:
        exact = self._rules.get(method)
        if exact is not None:
            return exact
        service = method.rsplit("/", 1)[0]
        return self._rules.get(service + "/*", frozenset())

    def allows(self, method: str, spiffe_id: str | None) -> bool:
        if spiffe_id is None:
            return False
        key = (method, spiffe_id)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(method, spiffe_id)
            if len(self._decisions) >= 4096:  # bounded: callers and methods are few
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def _decide(self, method: str, spiffe_id: str) -> bool:
        ident = SpiffeId.parse(spiffe_id)
        if ident is None or ident.trust_domain != self.trust_domain:
            return False
        names = self.allowed_names(method)
        return ident.name in names or ANY_WORKLOAD in names


class AuthzInterceptor(WrappingInterceptor):
    """PERMISSION_DENIED unless the method's rule lists the verified caller."""

    def __init__(self, policy: MethodPolicy) -> None:
        super().__init__()
        self._policy = policy

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        policy = self._policy

        async def check(context: Context) -> None:
            caller = peer_spiffe_id(context)
            if not policy.allows(method, caller):
                _log.warning("caller_denied", method=method, caller=caller)
                await abort_with(PermissionDenied("caller not allowed", reason="CALLER_NOT_ALLOWED"), context)

        return wrap_handler(handler, before=check)
