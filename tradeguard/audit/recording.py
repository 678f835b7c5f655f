"""A service recording its own security events in the audit service: the auth service's logins, second factors,
key creation and revocation; the key vault's key administration and decryptions.

A service declares WHICH of its methods are security events and the action each one records
(`tradeguard.service.Declaration(recorded={"/pkg.Service/Login": "login", ...})`); the kit's runner mounts a
`RecordingLayer` in its chain when its settings' `recording` (a `RecordingSettings`) is on — the default. Per call
of a recorded method, after the handler and BEFORE the response is released, one event is appended through the
kit's recorder (tradeguard.audit.recorder: batched, durable once acknowledged):

- what: the method, the declared action, the outcome from the handler's status (OK; UNAUTHENTICATED →
  DENIED_AUTHENTICATION, its opaque error's cause in `details["cause"]` — what was wrong, never the credential;
  PERMISSION_DENIED → DENIED_PERMISSION; RESOURCE_EXHAUSTED (a lockout) → DENIED_QUOTA; INVALID_ARGUMENT →
  INVALID; anything else → FAILED), the status code name, the latency;
- who: the caller's SPIFFE ID, the source IP (the connection's, or the client's address the HTTP edge forwards,
  believed from the edge only), the request id; the user (`principal`) the handler named in its log line
  (`annotate(user_id=...)`) or the request names (`user_id`, `username`); the API key (`key_id` annotated or in
  the request) — never a password, secret, token or code: only these named fields are read;
- on what: `resource`, the first of the request's `key_id`, `user_id`, `name`, `key_name`, `username`, `jti`,
  `family_id`, `role` that is set (or the key or user id the handler annotated, for one it created); in
  `details`, what the handler annotated among `mfa`, `revoked`, `version`, `key_version`.

Fail closed: a call that succeeded but whose event was not acknowledged is answered UNAVAILABLE with ErrorInfo
reason `OUTCOME_UNKNOWN` (the action may have taken effect: a login's tokens are never handed out, a key's
secret never shown, a decryption's plaintext never released unaudited); a call the handler refused keeps its
refusal (a failure is never turned into a success, and never hidden).

Calls from `unrecorded` workloads are not recorded: the audit service's own calls to the key vault (signing its
checkpoints) cannot wait on the audit service itself; they are in the vault's log lines.

Settings, under the service's own prefix (`TRADEGUARD_<NAME>_`): `AUDIT` (default true), `AUDIT_TARGET`
(host:port of the audit service, default 127.0.0.1:<the registry's audit port>), `AUDIT_SERVER_NAME` (the name its
certificate carries, default `audit`). The audit service must let the service's workload record (its RECORDERS).
"""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from tradeguard.audit.recorder import Recorder, handler_outcome, status_of
from tradeguard.errors import OpaqueError, Unavailable
from tradeguard.mesh.client import current_request_id
from tradeguard.mesh.identity import peer_spiffe_id
from tradeguard.mesh.peer import source_ip
from tradeguard.observability.annotations import current_annotations
from tradeguard.registry import lookup
from tradeguard.rpc.handlers import After, Context, Layer, RequestCheck
from tradeguard.settings import Env

__all__ = ["OUTCOME_UNKNOWN", "RecordingLayer", "RecordingSettings"]

OUTCOME_UNKNOWN: Final = "OUTCOME_UNKNOWN"
_RESOURCE_FIELDS: Final = ("key_id", "user_id", "name", "key_name", "username", "jti", "family_id", "role")
#: what a handler annotated that the event carries in `details` (never secrets: annotations go to the log line too)
_DETAILS: Final = ("mfa", "revoked", "version", "key_version")
_PRINCIPAL_FIELDS: Final = ("user_id", "username")


@dataclass(frozen=True)
class RecordingSettings:
    """Whether and where a service records its security events (see the module for the variables)."""

    enabled: bool = True
    target: str = f"127.0.0.1:{lookup('audit').port}"
    server_name: str = "audit"

    @classmethod
    def read(cls, env: Env) -> RecordingSettings:
        return cls(
            enabled=env.flag("AUDIT", True),
            target=env.text("AUDIT_TARGET", cls.target),
            server_name=env.text("AUDIT_SERVER_NAME", cls.server_name),
        )


@dataclass(slots=True)
class _Call:
    context: object
    request: Any
    time_us: int
    started: float


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("tradeguard_recorded_call", default=None)


def _text(source: Any, names: Collection[str]) -> str:
    for name in names:
        value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


class RecordingLayer(Layer):
    """Records every call of the `actions`' methods (full method name → action) through `recorder` (see the
    module); calls from the `unrecorded` workloads are let through unrecorded."""

    def __init__(
        self,
        recorder: Recorder,
        actions: Mapping[str, str],
        *,
        trust_domain: str,
        unrecorded: Collection[str] = (),
    ) -> None:
        self.recorder = recorder
        self._actions = dict(actions)
        self._trust_domain = trust_domain
        self._unrecorded = frozenset(f"spiffe://{trust_domain}/svc/{name}" for name in unrecorded)

    def for_method(self, method: str) -> RequestCheck | None:
        return self.before if method in self._actions else None

    async def before(self, context: Context, request: Any, raw: bytes) -> None:
        if peer_spiffe_id(context) in self._unrecorded:
            _CALL.set(None)
            return
        _CALL.set(_Call(context, request, self.recorder.clock_us(), time.perf_counter()))

    def after_for_method(self, method: str) -> After | None:
        action = self._actions.get(method)
        if action is None:
            return None
        return functools.partial(self._after, method, action)

    async def _after(
        self, method: str, action: str, context: Context, error: BaseException | None, done: bool
    ) -> None:
        call = _CALL.get()
        if not done or call is None or call.context is not context:
            return  # not this call's (an unrecorded caller's) or a stream not ended yet
        _CALL.set(None)
        request = call.request
        notes = current_annotations() or {}
        status = status_of(error, context)
        event = self.recorder.event(
            time_us=call.time_us,
            method=method,
            outcome=handler_outcome(error, status),
            status=status,
            latency_us=int((time.perf_counter() - call.started) * 1_000_000),
            principal=_text(notes, ("user_id",)) or _text(request, _PRINCIPAL_FIELDS),
            api_key_id=_text(notes, ("key_id",)) or _text(request, ("key_id",)),
            caller=peer_spiffe_id(context) or "",
            source_ip=source_ip(context, self._trust_domain),
            resource=_text(request, _RESOURCE_FIELDS) or _text(notes, ("key_id", "user_id")),
            action=action,
            request_id=current_request_id() or "",
            cause=error.cause if isinstance(error, OpaqueError) else "",
            details={name: str(notes[name]) for name in _DETAILS if name in notes},
        )
        if await self.recorder.record(event) or error is not None:
            return  # acknowledged, or a refusal/failure that stands as it is
        raise Unavailable(
            "audit service unavailable: the call's outcome is unknown (it may have taken effect)",
            reason=OUTCOME_UNKNOWN,
        )
