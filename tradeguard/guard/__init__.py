"""The guard: the kit's server-side authentication, authorisation, quota and audit stages, and its client side.

- `guard_for(GuardConfig(...), workload=..., trust_domain=...)` → a `MountedGuard` whose `layer` goes into a
  server's chain (tradeguard.guard.config; a service run by the kit's runner just declares `permissions=`);
- `Guard` (tradeguard.guard.layer): per method, the credentials (JWT, signed API key, or the edge's headers) →
  the `Principal` the handler reads with `tradeguard.principal.current_principal()`;
- `JwksCache`, `JwtVerifier` (tradeguard.guard.jwt), `RevocationSet`, `RevocationWatcher`
  (tradeguard.guard.revocations), `SignedVerifier` (tradeguard.guard.signed), `QuotaStage` (tradeguard.guard.quota:
  each verified call counted by the rate-limit service, fail closed), `AuditStage` (tradeguard.guard.audit: every
  call recorded by the audit service, the response released only once its event is durable, fail closed);
- clients: `signing_interceptors`, `bearer_interceptors`, `authenticated_channel` (tradeguard.guard.client).
"""

from __future__ import annotations

from tradeguard.guard.audit import AuditStage
from tradeguard.guard.client import (
    ApiKeyCredentials,
    authenticated_channel,
    bearer_interceptors,
    signing_interceptors,
)
from tradeguard.guard.config import GuardConfig, GuardSettings, MountedGuard, guard_for
from tradeguard.guard.jwt import JwksCache, JwtVerifier, cert_thumbprint
from tradeguard.guard.layer import Guard
from tradeguard.guard.quota import QuotaStage
from tradeguard.guard.revocations import RevocationSet, RevocationWatcher
from tradeguard.guard.signed import SignedVerifier

__all__ = [
    "ApiKeyCredentials",
    "AuditStage",
    "Guard",
    "GuardConfig",
    "GuardSettings",
    "JwksCache",
    "JwtVerifier",
    "MountedGuard",
    "QuotaStage",
    "RevocationSet",
    "RevocationWatcher",
    "SignedVerifier",
    "authenticated_channel",
    "bearer_interceptors",
    "cert_thumbprint",
    "guard_for",
    "signing_interceptors",
]
