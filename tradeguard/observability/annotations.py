"""Fields that a handler adds to its RPC's one log line, instead of logging a line of its own.

The telemetry interceptor opens a scope per call; `annotate(**fields)` inside the handler (or code it calls,
such as a service core) adds to it, and the interceptor writes the fields into the call's ``rpc`` line. One line
per RPC carries what the call did (the key used, its version, the outcome) beside how it ended; a second line
per call would cost as much again (profiled: a log line is the largest part of the kit's per-call work).
Outside an RPC, `annotate` returns False and the caller logs a line of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any

__all__ = ["annotate", "close_scope", "current_annotations", "open_scope"]

_SCOPE: ContextVar[dict[str, Any] | None] = ContextVar("tradeguard_rpc_annotations", default=None)


def annotate(**fields: Any) -> bool:
    """Add `fields` to the current RPC's log line (later values win); False when no RPC is in progress."""
    scope = _SCOPE.get()
    if scope is None:
        return False
    scope.update(fields)
    return True


def current_annotations() -> Mapping[str, Any] | None:
    """What the current RPC's handler annotated so far (read only: the audit recording layer takes the user and
    key ids from it), or None outside an RPC."""
    scope = _SCOPE.get()
    return None if scope is None else MappingProxyType(scope)


def open_scope() -> tuple[dict[str, Any], Token[dict[str, Any] | None]]:
    """Start collecting for one call: the dict that will hold its annotations, and the token to close it."""
    scope: dict[str, Any] = {}
    return scope, _SCOPE.set(scope)


def close_scope(token: Token[dict[str, Any] | None]) -> None:
    _SCOPE.reset(token)
