"""Who a verified call acts for: the principal the guard hands to a handler.

Set by the guard (tradeguard.guard) for the duration of one call, read by the handler with `current_principal()`.
Plain data: no grpc, so a service's core can take it as an argument.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

__all__ = ["Principal", "current_principal", "reset_principal", "set_principal"]


@dataclass(frozen=True, slots=True)
class Principal:
    """A user (and, for a signed API-key call, the key) verified for this call."""

    user_id: str
    account_id: str
    scopes: frozenset[str]
    tier: str = ""
    key_id: str | None = None  # set when an API key signed the call
    token_id: str | None = None  # the access token's jti when a JWT authenticated the call
    amr: tuple[str, ...] = ()  # how the user authenticated (RFC 8176: pwd, otp, ...), for a JWT
    # when the user authenticated, µs (a JWT's `auth_time`: set only on a token minted by a login, never by a
    # refresh); 0 when unknown
    auth_time_us: int = 0

    def fresh_mfa(self, now_us: int, max_age_us: int) -> bool:
        """Whether the user passed a second factor (`otp` in amr) in a login at most `max_age_us` ago (step-up)."""
        return "otp" in self.amr and self.auth_time_us > 0 and now_us - self.auth_time_us <= max_age_us

    def allows(self, permission: str) -> bool:
        return permission in self.scopes


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "tradeguard_principal", default=None
)


def current_principal() -> Principal | None:
    """The principal of the call being handled (None outside a guarded call)."""
    return _current.get()


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Make `principal` current for this call; hand the token to `reset_principal` when the call ends."""
    return _current.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _current.reset(token)
